"""How much a data-path transport buffers for writing before its peer stops being read.

Every transport of the data path (app side and upstream side, TCP and HTTP) is given these
with ``set_write_buffer_limits``: a side whose buffer passes the high mark pauses reading
the other side, and resumes once it drains below the low one.
"""

WRITE_HIGH_WATER = 1024 * 1024  # a side stops reading its peer when its own buffer holds this
WRITE_LOW_WATER = 256 * 1024  # ... and starts again once the buffer drains below this
