/// How far apart two names are, for "did you mean": the edit distance (insertions, deletions and
/// substitutions of bytes).
package enum TextDistance {
    /// Whether `a` and `b` are at most `limit` edits apart.
    package static func atMost(_ limit: Int, _ a: String, _ b: String) -> Bool {
        let a = Array(a.utf8)
        let b = Array(b.utf8)
        guard abs(a.count - b.count) <= limit else { return false }
        var previous = Array(0...b.count)
        for (i, x) in a.enumerated() {
            var current = [i + 1]
            for (j, y) in b.enumerated() {
                current.append(min(previous[j + 1] + 1, current[j] + 1, previous[j] + (x == y ? 0 : 1)))
            }
            previous = current
        }
        return previous[b.count] <= limit
    }
}
