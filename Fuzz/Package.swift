// swift-tools-version:5.4
// libFuzzer targets for kora-sidecar's parsers of outside input. Kept out of the root package:
// an executable whose entry point is `LLVMFuzzerTestOneInput` (no `main`) only links with
// `-sanitize=fuzzer`. Tools 5.4: a `main.swift` target is an executable whose entry point is not
// renamed (5.5 renames it to `<module>_main`, which libFuzzer's `main` never calls). Build and run
// them with `scripts/fuzz`. They depend on the core alone (swift-crypto, no server), so they build quickly.
import Foundation
import PackageDescription

let fuzzTargets = ["FuzzSignature", "FuzzNormalizer", "FuzzConfiguration", "FuzzDuration"]

// A path dependency's identity is its folder's name, which differs from clone to clone.
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent.lowercased()

let package = Package(
    name: "KoraSidecarFuzz",
    dependencies: [.package(path: "..")],
    targets: fuzzTargets.map { .target(name: $0, dependencies: [.product(name: "KoraSidecarCore", package: root)]) }
)
