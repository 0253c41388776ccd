// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "swift-nbd",
    // macOS 15 for task executors (NBDExport.taskExecutor).
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "NBD", targets: ["NBD"]),
        .library(name: "NBDServer", targets: ["NBDServer"]),
        // Pre-1.0 API: may change in a minor release until it has had users.
        .library(name: "NBDCopy", targets: ["NBDCopy"]),
        .executable(name: "nbd", targets: ["nbd"]),
        .executable(name: "nbd-example", targets: ["nbd-example"]),
        .executable(name: "nbd-bench", targets: ["nbd-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        // The tool's blkhash digests (nbd copy --blkhash, nbd checksum).
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        // NBDServer is a Service; nbd serve runs it in a ServiceGroup.
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // `swift package generate-documentation --target NBD` builds the DocC catalog.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // Sans-IO protocol core: wire types and state machines, no sockets.
        .target(
            name: "NBDCore",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")]
        ),
        // What the client and the server share about SwiftNIO's event loops.
        .target(
            name: "NBDEventLoop",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")]
        ),
        // The package's one layer over the C library: files, block devices, socket calls.
        .target(
            name: "NBDSystem",
            dependencies: [.product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")]
        ),
        // What the client and the server share about TLS: credential files, PSK key files.
        .target(
            name: "NBDTLS",
            dependencies: ["NBDCore", .product(name: "NIOSSL", package: "swift-nio-ssl")]
        ),
        // The async/await client over SwiftNIO.
        .target(
            name: "NBD",
            dependencies: [
                "NBDCore", "NBDEventLoop", "NBDSystem", "NBDTLS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                // NBDClient is a Service (graceful shutdown); the server needs the package anyway.
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // The built-in server: backends, connections, listener.
        .target(
            name: "NBDServer",
            dependencies: [
                "NBDCore", "NBDEventLoop", "NBDSystem", "NBDTLS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // The copy engine: copies, checksums, verification and resumable journals between
        // exports, files and streams; the tool's copy-family commands are built on it.
        .target(
            name: "NBDCopy",
            dependencies: [
                "NBD", "NBDCore", "NBDSystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // The command-line tool: info, copy, dump, serve.
        .executableTarget(
            name: "nbd",
            dependencies: [
                "NBD",
                "NBDCopy",
                "NBDServer",
                "NBDSystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(name: "nbd-example", dependencies: ["NBD", "NBDServer", .product(name: "NIOCore", package: "swift-nio")]),
        .executableTarget(
            name: "nbd-bench",
            dependencies: [
                "NBD", "NBDServer", "NBDSystem",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // What more than one test target needs: running programs, waiting on them, seeds, ports,
        // and the client and server connection machines back to back.
        .target(
            name: "TestSupport",
            dependencies: ["NBDCore", .product(name: "NIOCore", package: "swift-nio")],
            path: "Tests/TestSupport"
        ),
        .testTarget(
            name: "NBDCoreTests",
            dependencies: ["NBDCore", "TestSupport", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "NBDTests",
            dependencies: [
                "NBD", "NBDCore", "NBDTLS", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "NBDCopyTests",
            dependencies: [
                "NBDCopy", "NBDCore", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "NBDSystemTests",
            dependencies: ["NBDSystem", "TestSupport", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: [
                "NBD", "NBDCore", "NBDServer", "NBDSystem", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "InteropTests",
            dependencies: [
                "NBD", "NBDCopy", "NBDCore", "NBDServer", "nbd", "nbd-example", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
    ]
)

// The unit-test targets alone, without the interop suite and the executables it starts: what
// CI's TSan step builds (scripts/test.sh sets NBD_UNIT_TESTS for it), a minute and a half
// less to compile again with the sanitizer.
if Context.environment["NBD_UNIT_TESTS"] != nil {
    let startedByTheInteropSuite: Set = ["InteropTests", "nbd", "nbd-example", "nbd-bench"]
    package.targets.removeAll { startedByTheInteropSuite.contains($0.name) }
    package.products.removeAll { startedByTheInteropSuite.contains($0.name) }
}

// The package's own code under a sanitizer, its dependencies as the plain build made them:
// what CI's TSan step builds in .build (scripts/sanitize.sh thread --in-place sets this). Only
// our modules are compiled again (a minute rather than four); the races looked for are in our
// code, and what SwiftNIO's code does is seen through the locks, file descriptors and Swift
// concurrency runtime that ThreadSanitizer follows on its own.
if let sanitizer = Context.environment["NBD_SANITIZE_OWN_CODE"] {
    for target in package.targets {
        target.swiftSettings = (target.swiftSettings ?? []) + [.unsafeFlags(["-sanitize=\(sanitizer)"])]
        target.linkerSettings = (target.linkerSettings ?? []) + [.unsafeFlags(["-sanitize=\(sanitizer)"])]
    }
}

// libFuzzer targets, one per parser of a peer's bytes: built only by scripts/fuzz.sh, which
// sets NBD_FUZZ and builds them with -sanitize=fuzzer,address (they have no main of their own).
// A parser outside NBDCore is compiled into its target from its own file (a link in the target's
// folder), so that fuzzing builds NBDCore alone, not the TLS stack (110 s rather than 360 s).
if Context.environment["NBD_FUZZ"] != nil {
    let nio = Target.Dependency.product(name: "NIOCore", package: "swift-nio")
    package.targets.append(.target(name: "FuzzSupport", dependencies: [nio], path: "Fuzz/Support"))
    for name in ["ClientNegotiation", "ClientTransmission", "ServerNegotiation", "ServerTransmission", "URI", "ServerHello", "PSKFile"] {
        package.targets.append(
            .executableTarget(
                name: "Fuzz\(name)",
                dependencies: ["NBDCore", "FuzzSupport", nio],
                path: "Fuzz/\(name)",
                exclude: ["seeds"]
            )
        )
    }
}
