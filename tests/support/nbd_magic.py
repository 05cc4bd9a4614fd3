"""NBD wire magics, spelled out independently of pynbd.protocol so the raw-socket test
peers (tests/client/fakeserver.py, tests/server/rawnbd.py) check the real values."""

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF
