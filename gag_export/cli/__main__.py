"""`python -m gag_export.cli ...`"""

from . import main

main()
