import KoraSidecar

/// Input: a webhook body. Whatever the normaliser accepts must come out as valid JSON, and the
/// parser must never crash, with or without duplicate-key rejection.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let body = Array(UnsafeBufferPointer(start: start, count: count))
    _ = try? JSONParser.parse(body, rejectDuplicateKeys: true)
    if let event = try? EventNormalizer.normalize(body: body, webhookID: "fuzz", receivedAt: UnixTime(milliseconds: 1_795_000_000_000)) {
        precondition((try? JSONParser.parse(event.normalizedBody)) != nil, "the normalised body is not JSON")
    }
    return 0
}
