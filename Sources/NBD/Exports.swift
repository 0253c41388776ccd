// The wire types, state machines and errors of NBDCore are part of this library's API.
@_exported import NBDCore
