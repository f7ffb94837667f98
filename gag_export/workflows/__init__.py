"""Where the build side and the run side meet: the only package that imports both.

`artifacts`: export the graphs and build the engines a backend needs when they are missing (the
one copy, for `generate`, `bench` and the Python API). `build`: `gag-export build`. `bench`: timing
backends and GAG side by side.
"""
