import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Runs blocking work on a thread of its own, never on the cooperative pool (which has one thread
/// per core: a blocked read there would starve the server under test).
func offPool<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: work()) }.start()
    }
}

/// A raw TCP client for what a well-behaved HTTP client cannot send: partial bodies, huge headers,
/// slow or malformed requests. Reads block, so tests call them through `offPool` (the async
/// variants below).
final class RawConnection: @unchecked Sendable {
    private let fd: Int32

    /// Connects to 127.0.0.1:`port`; reads give up after `readTimeout`. `receiveBuffer` shrinks the
    /// kernel's buffer of what the server sent (a client that reads little).
    init(port: Int, readTimeout: Int = 10, receiveBuffer: Int32? = nil) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        if var size = receiveBuffer { setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size)) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard result == 0 else { throw TimedOut(what: "a connection to port \(port)") }
        var timeout = timeval(tv_sec: readTimeout * Sanitizer.slowdown, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    /// Sends bytes; false when the peer has closed.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } == bytes.count
    }

    @discardableResult
    func send(_ text: String) -> Bool { send(Array(text.utf8)) }

    /// ``readResponse()`` off the cooperative pool.
    func response() async -> String { await offPool { self.readResponse() } }

    /// The next response head (status line and headers, up to the blank line), off the cooperative
    /// pool: an interim `100 Continue` has no body to wait for.
    func head() async -> String {
        await offPool {
            var data: [UInt8] = []
            var byte: UInt8 = 0
            while !data.ends(with: Array("\r\n\r\n".utf8)), recv(self.fd, &byte, 1, 0) == 1 { data.append(byte) }
            return String(decoding: data, as: UTF8.self)
        }
    }

    /// ``isClosedByPeer()`` off the cooperative pool.
    func closedByPeer() async -> Bool { await offPool { self.isClosedByPeer() } }

    /// Reads until the peer closes, the read times out, or a full response head with its
    /// Content-Length body has arrived.
    func readResponse() -> String {
        var data: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = recv(fd, &buffer, buffer.count, 0)
            if count <= 0 { break }
            data.append(contentsOf: buffer[0..<count])
            let text = String(decoding: data, as: UTF8.self)
            if let headEnd = text.range(of: "\r\n\r\n") {
                let head = text[..<headEnd.lowerBound].lowercased()
                if let line = head.split(separator: "\r\n").first(where: { $0.hasPrefix("content-length:") }),
                    let length = Int(line.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)),
                    text.utf8.count - text.utf8.distance(from: text.startIndex, to: headEnd.upperBound) >= length
                {
                    break
                }
            }
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Whether the peer closed the connection (a read returns end of stream) within the read time-out.
    func isClosedByPeer() -> Bool { readEnd() != .timedOut }

    /// Whether the peer sent something not read yet (an answer), without reading it or waiting.
    var hasBytesToRead: Bool {
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) > 0
    }

    /// How the peer's side of the connection ended, read within the read time-out.
    enum End { case endOfStream, reset, timedOut }

    func readEnd() -> End {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = recv(fd, &buffer, buffer.count, 0)
            if count == 0 { return .endOfStream }
            if count < 0 { return errno == ECONNRESET ? .reset : .timedOut }
        }
    }
}

extension Array where Element: Equatable {
    /// Whether the array's last elements are `suffix`.
    fileprivate func ends(with suffix: [Element]) -> Bool { count >= suffix.count && Array(self[(count - suffix.count)...]) == suffix }
}

/// The status code of a raw HTTP response.
func statusCode(of response: String) -> Int? {
    guard response.hasPrefix("HTTP/1.1 ") else { return nil }
    return Int(response.dropFirst(9).prefix(3))
}
