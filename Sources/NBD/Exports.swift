// What users of the client need from NBDCore, by name: the errors, addresses, the export's
// description and the flags and values its calls take. The wire types and state machines are
// SPI of NBDCore (`@_spi(NBDMachines)`): the library's own targets, tests and fuzzers use them.
@_exported import struct NBDCore.BlockSizeConstraints
@_exported import struct NBDCore.CommandFlags
@_exported import struct NBDCore.HandshakeFlags
@_exported import struct NBDCore.InfoType
@_exported import enum NBDCore.NBDAddress
@_exported import struct NBDCore.NBDErrno
@_exported import struct NBDCore.NBDError
@_exported import struct NBDCore.NBDExportInfo
@_exported import struct NBDCore.NBDMetaContext
@_exported import enum NBDCore.NBDTLSPolicy
@_exported import struct NBDCore.OptionReplyType
@_exported import struct NBDCore.TransmissionFlags
@_exported import enum NBDCore.TransmissionFormat
