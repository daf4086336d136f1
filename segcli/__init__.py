"""segcli: instance segmentation masks for folders of images and videos."""

import time

__version__ = "0.1.0"

# When segcli's code started (its imports come after): `segcli predict` reports how long after
# this its first result came, the start-up cost a user waits through.
STARTED = time.perf_counter()
