"""Zoo: what a built entry becomes: the zoo's records (this folder's *.json files), the KPID authors' sources, the
export folder and its model card, publishing to the Hub, and the timm registry of kpid_* names. Imports every layer
below (core, engine, budget, training, errors/_version) and other zoo modules, never the top-level build/dry_run/cli.
"""
