// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "KoraSidecar",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "kora-sidecar", targets: ["kora-sidecar"]),
        // The fuzzers (Fuzz/, a package of their own) build against the core alone.
        .library(name: "KoraSidecarCore", targets: ["KoraSidecarCore"]),
    ],
    traits: [
        .trait(
            name: "PostgreSQL",
            description: "State in PostgreSQL (storage.postgresURL), shared by replicas. Without it the binary keeps state in SQLite "
                + "only, and leaves out postgres-nio and, with it, the last user of full Foundation (and ICU's data): about half the binary."),
        .default(enabledTraits: ["PostgreSQL"]),
    ],
    dependencies: [
        // Without its default traits: no swift-configuration (the sidecar reads its own file) and
        // no full-Foundation extras (a `DateFormatter` form strategy), so Hummingbird builds on
        // FoundationEssentials and adds nothing to the build or the binary that we do not use.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
    ],
    // The layers, each importing only those above it in this list: the manifest is the architecture.
    targets: [
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        // What needs no server: JSON, signatures, normalisation, the configuration and its parsing, time, hex.
        .target(
            name: "KoraSidecarCore",
            dependencies: [.product(name: "Crypto", package: "swift-crypto")]
        ),
        // The server: ingress, delivery, storage, the Kora API proxy, operations.
        .target(
            name: "KoraSidecar",
            dependencies: [
                "KoraSidecarCore",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "PostgresNIO", package: "postgres-nio", condition: .when(traits: ["PostgreSQL"])),
                "CSQLite",
            ],
            // The delivery console, compiled into the binary as bytes: nothing to install or find at run time.
            resources: [.embedInCode("Console/index.html"), .embedInCode("Console/console.css"), .embedInCode("Console/console.js")]
        ),
        // The Kora stand-in (`simulate`) and the one-command tour (`demo`), built on the server's HTTP parts.
        .target(
            name: "KoraSimulator",
            dependencies: [
                "KoraSidecarCore", "KoraSidecar",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The thin executable: parses the command line, builds, runs.
        .executableTarget(
            name: "kora-sidecar",
            dependencies: [
                "KoraSidecarCore", "KoraSidecar", "KoraSimulator",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            // lld, and no dynamic symbol table for the executable's own symbols (nothing looks them up):
            // 5 MB less binary and about 4 MB less resident at idle, as the dynamic loader no longer
            // relocates and maps the exported symbols at start. A stripped binary's crash backtrace
            // then shows addresses, which the unstripped build of the same commit symbolicates.
            linkerSettings: [.unsafeFlags(["-use-ld=lld", "-Xlinker", "--no-export-dynamic"], .when(platforms: [.linux]))]
        ),
        // What tests use in place of production parts (the in-memory store).
        .target(
            name: "KoraSidecarTesting",
            dependencies: [
                "KoraSidecarCore", "KoraSidecar",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "KoraSidecarTests",
            dependencies: [
                "KoraSidecarCore", "KoraSidecar", "KoraSimulator", "KoraSidecarTesting",
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
