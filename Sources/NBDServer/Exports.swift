// What a backend and a caller of `NBDServer.start` need from NBDCore, by name.
@_exported import struct NBDCore.BlockDescriptor
@_exported import enum NBDCore.NBDAddress
@_exported import struct NBDCore.NBDErrno
@_exported import enum NBDCore.NBDServerReadPart
@_exported import enum NBDCore.NBDServerTLSMode
