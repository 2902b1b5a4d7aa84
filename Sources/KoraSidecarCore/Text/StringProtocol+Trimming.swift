extension StringProtocol {
    /// Without leading and trailing spaces and tabs (HTTP's optional whitespace, list items).
    package var trimmingSpaces: Substring {
        var text = self[...]
        while text.first == " " || text.first == "\t" { text = text.dropFirst() }
        while text.last == " " || text.last == "\t" { text = text.dropLast() }
        return Substring(text)
    }
}

extension StringProtocol {
    /// This text with every byte but RFC 3986's unreserved characters percent-encoded: fit for one
    /// URL path segment, or a socket path in the host of an `http+unix` URL.
    package var percentEncodingAllButUnreserved: String {
        utf8.map { Self.unreserved.contains($0) ? String(Unicode.Scalar($0)) : "%" + Hex.encode([$0]).uppercased() }.joined()
    }

    /// This text with each `%XX` replaced by its byte; nil when a `%` is not followed by two hex
    /// digits, the bytes are not UTF-8 or hold a NUL (a route parameter as a client encoded it).
    package var percentDecoded: String? {
        var bytes: [UInt8] = []
        var rest = Substring(self).utf8[...]
        while let byte = rest.popFirst() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let value = Hex.decode(rest.prefix(2)), value.count == 1, value[0] != 0 else { return nil }
            bytes += value
            rest = rest.dropFirst(2)
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static var unreserved: Set<UInt8> { Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~".utf8) }
}
