"""``uns run plant``: the asset graph of plant.yaml and the live health of every cell, line,
area and site, retained at ``{group}/_health``."""
