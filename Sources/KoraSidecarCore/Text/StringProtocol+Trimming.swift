extension StringProtocol {
    /// Without leading and trailing spaces and tabs (HTTP's optional whitespace, list items).
    package var trimmingSpaces: Substring {
        var text = self[...]
        while text.first == " " || text.first == "\t" { text = text.dropFirst() }
        while text.last == " " || text.last == "\t" { text = text.dropLast() }
        return Substring(text)
    }
}
