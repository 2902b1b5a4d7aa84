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

    private static var unreserved: Set<UInt8> { Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~".utf8) }
}
