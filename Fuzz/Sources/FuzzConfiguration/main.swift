import KoraSidecar

/// Input: a configuration file. Loading either succeeds or throws a problem list; it never crashes.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: start, count: count))
    do {
        _ = try SidecarConfiguration.load(bytes: bytes, source: "fuzz", environment: ["FUZZ_SECRET": "whsec_env"])
    } catch let error as ConfigurationError {
        precondition(!error.problems.isEmpty, "a configuration was refused without a reason")
    } catch {
        preconditionFailure("unexpected error \(error)")
    }
    return 0
}
