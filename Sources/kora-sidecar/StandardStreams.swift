#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import KoraSidecarCore

/// The process's standard streams, used directly: a line is written whole and at once (the demo's
/// and the simulator's lines are read as they come, by people and by tests), without full Foundation.
enum StandardStreams {
    static let output: Int32 = 1
    static let error: Int32 = 2

    /// Writes `text` and a newline to `descriptor`.
    static func writeLine(_ text: String, to descriptor: Int32) {
        var bytes = Array((text + "\n").utf8)[...]
        while !bytes.isEmpty {
            let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
            if written < 0, errno == EINTR { continue }
            guard written > 0 else { return }
            bytes = bytes.dropFirst(written)
        }
    }

    /// Standard input, read to its end.
    /// - Throws: ``StartupError`` when it cannot be read (never a part of it taken for the whole).
    static func readInput() throws -> [UInt8] {
        var input: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count >= 0 else { throw StartupError("Standard input cannot be read: \(String(cString: strerror(errno))).") }
            guard count > 0 else { return input }
            input += buffer[..<count]
        }
    }
}

/// Ends the process with `code` (inside a command, `exit` names ArgumentParser's own).
func exitProcess(_ code: Int32) -> Never {
    exit(code)
}
