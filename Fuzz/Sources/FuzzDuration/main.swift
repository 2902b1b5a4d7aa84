import KoraSidecarCore

/// libFuzzer's entry point: the property is FuzzProperty.duration (the Swift suite replays Fuzz/Corpus through it).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    if let failure = FuzzProperty.duration(Array(UnsafeBufferPointer(start: start, count: count))) { preconditionFailure(failure) }
    return 0
}
