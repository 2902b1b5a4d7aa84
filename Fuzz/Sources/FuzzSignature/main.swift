import KoraSidecar

/// Input: the first byte picks which header the rest lands in and how the others look; the rest,
/// split at the first newline, is a header value and the body. A verification that succeeds for
/// anything but the real signature of the body is a forgery and traps.
private let secret = Secret("whsec_fuzz")
private let verifier = SignatureVerifier(secrets: [secret], schemes: [.timestamped, .legacy], toleranceSeconds: 300)
private let now: Int64 = 1_795_000_000

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: start, count: count))
    guard let selector = bytes.first else { return 0 }
    let rest = bytes.dropFirst()
    let split = rest.firstIndex(of: 0x0A) ?? rest.endIndex
    let value = String(decoding: rest[..<split], as: UTF8.self)
    let body = Array(rest[split...].dropFirst())
    var headers = SignatureHeaders()
    switch selector % 4 {
    case 0: headers = SignatureHeaders(signature: value, timestamp: String(now), algorithm: "sha256")
    case 1: headers = SignatureHeaders(signature: KoraSignature.timestamped(secret: secret, timestamp: value, body: body), timestamp: value)
    case 2: headers = SignatureHeaders(legacySignature: value)
    default: headers = SignatureHeaders(signature: value, timestamp: value, algorithm: value, legacySignature: value)
    }
    if case .success(let scheme) = verifier.verify(body: body, headers: headers, now: now) {
        let genuine: Bool
        switch scheme {
        case .timestamped:
            genuine = headers.signature?.lowercased() == KoraSignature.timestamped(secret: secret, timestamp: headers.timestamp ?? "", body: body)
                && abs(now - (Int64(headers.timestamp ?? "") ?? .max / 2)) <= 300
        case .legacy:
            genuine = headers.legacySignature?.lowercased() == KoraSignature.legacy(secret: secret, body: body)
        }
        precondition(genuine, "a signature verified that is not the body's own")
    }
    return 0
}
