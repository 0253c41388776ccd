@_spi(NBDMachines) import NBDCore

extension NBDExport {
    /// Connects to the export a URI names, ready for I/O, in one call: dial, handshake,
    /// extended headers or structured replies (see ``NBDClientConfiguration/transmissionFormat``),
    /// the configured metadata contexts (`base:allocation` by default),
    /// then GO with `NBD_INFO_BLOCK_SIZE` (or EXPORT_NAME for servers without GO).
    ///
    /// ```swift
    /// let export = try await NBDExport.connect(to: NBDURI("nbd://localhost/disk"))
    /// let first = try await export.read(at: 0, length: 4096)
    /// await export.disconnect()
    /// ```
    public static func connect(to uri: NBDURI, configuration: NBDClientConfiguration = NBDClientConfiguration()) async throws -> NBDExport {
        let connection = try await NBDConnection.connect(to: uri, configuration: configuration)
        let format = try await connection.negotiateFormat(upTo: configuration.transmissionFormat)
        if format.hasChunks, !configuration.metaContexts.isEmpty {
            do {
                try await connection.setMetaContexts(for: uri.exportName, queries: configuration.metaContexts.map(\.name))
            } catch let error as NBDError where error.connectionUsable {
                // A server without metadata contexts still serves data: go on without block status.
                configuration.logger.debug("no metadata contexts", metadata: ["error": "\(error)"])
            }
        }
        return try await connection.go(uri.exportName)
    }

    /// Parses `uri` and connects; see ``connect(to:configuration:)-(NBDURI,_)``.
    public static func connect(to uri: String, configuration: NBDClientConfiguration = NBDClientConfiguration()) async throws -> NBDExport {
        try await connect(to: NBDURI(uri), configuration: configuration)
    }

    /// Connects, runs `body`, and always disconnects softly afterwards, whether `body`
    /// returned or threw.
    public static func withExport<Result: Sendable>(
        _ uri: NBDURI,
        configuration: NBDClientConfiguration = NBDClientConfiguration(),
        _ body: (NBDExport) async throws -> Result
    ) async throws -> Result {
        let export = try await connect(to: uri, configuration: configuration)
        do {
            let result = try await body(export)
            await export.disconnect()
            return result
        } catch {
            await export.disconnect()
            throw error
        }
    }

    /// ``withExport(_:configuration:_:)-(NBDURI,_,_)`` with the URI as text.
    public static func withExport<Result: Sendable>(
        _ uri: String,
        configuration: NBDClientConfiguration = NBDClientConfiguration(),
        _ body: (NBDExport) async throws -> Result
    ) async throws -> Result {
        try await withExport(try NBDURI(uri), configuration: configuration, body)
    }
}
