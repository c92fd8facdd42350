"""``python -m ds_moe_replicate.bench``: the MoE stack benchmark (see ``bench/bench.py``).

Inside the ``deepspeed`` launcher it uses the launcher's ranks; started alone it runs one rank.
"""

import os

from ..testing import free_port
from .bench import main

if __name__ == "__main__":
    # NOTE: a plain start has no launcher environment; make it a one-rank process group.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))  # never a fixed port: others may hold it
    raise SystemExit(main())
