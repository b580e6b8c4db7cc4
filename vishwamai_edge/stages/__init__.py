"""The build's stages: plain functions, one artifact each, written atomically and stamped (`stamps`).

`build.py` composes them; a model family (`vishwamai_edge.families`) calls the ones its layout needs.
"""
