import NIOConcurrencyHelpers
import Foundation
import PostgresNIO

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// A real PostgreSQL server for the tests: Debian's binaries (`scripts/setup` installs them),
/// initialised in a temporary directory, listening on 127.0.0.1 on a free port, stopped when the
/// test process exits. As root it runs as the `postgres` user, since PostgreSQL refuses root.
final class PostgresServer: Sendable {
    let directory: String
    let port: Int
    private let bin: String

    /// The server most tests share; each test takes a database of its own on it.
    static func shared() async throws -> PostgresServer { try await sharedServer.value }

    private static let sharedServer = Task { try await PostgresServer() }
    private static let started = NIOLockedValueBox<[PostgresServer]>([])

    /// Initialises and starts a server of its own (a test that restarts its server needs one).
    init() async throws {
        let bin = try Self.binaries()
        let directory = try temporaryDirectory()
        if getuid() == 0 { try await Self.spawn("/usr/bin/chown", ["postgres:postgres", directory]) }
        try await Self.spawn(program: bin + "/initdb", ["-D", directory + "/data", "-U", "kora", "-A", "trust", "--no-sync", "-E", "UTF8"])
        // The free port is released before the server binds it, so a listener the other tests open
        // meanwhile can take it: the server then tries another one.
        var attempts = 0
        while true {
            let port = try freePort()
            do {
                try await Self.start(bin: bin, directory: directory, port: port)
                (self.bin, self.directory, self.port) = (bin, directory, port)
                break
            } catch let failure as ToolFailed where failure.description.contains("Address already in use") && attempts < 4 {
                attempts += 1
            }
        }
        let first = Self.started.withLockedValue { started in
            started.append(self)
            return started.count == 1
        }
        if first { atexit { PostgresServer.stopAll() } }
    }

    /// A new, empty database on this server, as the URL the sidecar takes.
    func createDatabase() async throws -> String {
        let name = "t" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        try await Self.spawn(bin + "/psql", ["-h", "127.0.0.1", "-p", "\(port)", "-U", "kora", "-d", "postgres", "-qc", "CREATE DATABASE \(name)"])
        return url(database: name)
    }

    func url(database: String, user: String = "kora") -> String { "postgres://\(user)@127.0.0.1:\(port)/\(database)?sslmode=disable" }

    /// Runs `sql` as the server's superuser, in `database`.
    func execute(_ sql: String, database: String = "postgres") async throws {
        try await Self.spawn(bin + "/psql", ["-h", "127.0.0.1", "-p", "\(port)", "-U", "kora", "-d", database, "-v", "ON_ERROR_STOP=1", "-qc", sql])
    }

    /// Starts the server again on its port (after `stop()`).
    func start() async throws { try await Self.start(bin: bin, directory: directory, port: port) }

    /// A failure carries the end of the server's log, which says why (pg_ctl only says to read it).
    private static func start(bin: String, directory: String, port: Int) async throws {
        let log = directory + "/server.log"
        do {
            try await spawn(program: bin + "/pg_ctl", [
                "start", "-w", "-D", directory + "/data", "-l", log,
                "-o", "-p \(port) -h 127.0.0.1 -k \(directory) -F -c max_connections=300",
            ])
        } catch let failure as ToolFailed {
            let lines = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").suffix(6)
            throw ToolFailed(description: failure.description + "\n" + lines.joined(separator: "\n"))
        }
    }

    /// Stops the server at once, as a crash or a failover would.
    func stop() async throws {
        try await run("pg_ctl", ["stop", "-w", "-m", "immediate", "-D", directory + "/data"])
    }

    /// Runs one of the server's programs, as `postgres` when the tests run as root.
    private func run(_ program: String, _ arguments: [String]) async throws {
        try await Self.spawn(program: bin + "/" + program, arguments)
    }

    private static func stopAll() {
        for server in started.withLockedValue({ $0 }) {
            _ = try? spawnAndWait(program: server.bin + "/pg_ctl", ["stop", "-m", "immediate", "-D", server.directory + "/data"])
            try? FileManager.default.removeItem(atPath: server.directory)
        }
    }

    private static func spawn(program: String, _ arguments: [String]) async throws {
        try await offPool { Result { try spawnAndWait(program: program, arguments) } }.get()
    }

    private static func spawn(_ executable: String, _ arguments: [String]) async throws {
        try await offPool { Result { try spawnAndWait(executable, arguments) } }.get()
    }

    /// `program` as the `postgres` user when the tests run as root.
    private static func spawnAndWait(program: String, _ arguments: [String]) throws {
        if getuid() == 0 {
            try spawnAndWait("/usr/sbin/runuser", ["-u", "postgres", "--", program] + arguments)
        } else {
            try spawnAndWait(program, arguments)
        }
    }

    /// Runs a command to completion (Foundation's `Process` was seen spinning in `waitUntilExit` on
    /// `runuser`); its output goes to a file read back on failure.
    private static func spawnAndWait(_ executable: String, _ arguments: [String]) throws {
        let output = NSTemporaryDirectory() + "/pg-" + String(UInt32.random(in: 0...UInt32.max), radix: 36) + ".out"
        defer { unlink(output) }
        // Nothing else is inherited (Child closes every other descriptor): the server would count the
        // tests' open sockets against its own limit.
        let status = try Child(
            executable, arguments, environment: ProcessInfo.processInfo.environment, output: .file(output), error: .sameAsOutput
        ).waitForExit()
        guard status == 0 else {
            let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
            throw ToolFailed(description: "\(executable) \(arguments.first ?? "") failed (\(status)): \(text)")
        }
    }

    /// The newest installed PostgreSQL's `bin` folder.
    private static func binaries() throws -> String {
        let root = "/usr/lib/postgresql"
        let versions = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        guard let newest = versions.compactMap(Int.init).max(), FileManager.default.fileExists(atPath: "\(root)/\(newest)/bin/postgres")
        else { throw ToolFailed(description: "PostgreSQL is not installed under \(root): run scripts/setup (apt-get install postgresql)") }
        return "\(root)/\(newest)/bin"
    }
}

/// A TCP port that nothing listens on now: bound to port 0, read, released.
func freePort() throws -> Int {
    let socket = Foundation.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard socket >= 0 else { throw ToolFailed(description: "socket() failed") }
    defer { close(socket) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(socket, $0, length) == 0 && getsockname(socket, $0, &length) == 0 }
    }
    guard bound else { throw ToolFailed(description: "bind() failed") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Runs statements on `url` as another client would, and the first column of the last one's rows.
func postgresSQL(_ url: String, _ statements: PostgresQuery...) async throws -> [Int64] {
    let client = PostgresClient(configuration: try PostgresURL(Secret(url)).clientConfiguration, backgroundLogger: quietLogger)
    let pool = Task { await client.run() }
    defer { pool.cancel() }
    var last: [Int64] = []
    for statement in statements {
        last = try await client.query(statement, logger: quietLogger).collect().map { try $0.decode(Int64.self) }
    }
    return last
}

/// Another session on `url`, as a replica that stalled while it holds a lock: it runs `take`, holds
/// what that took until `release` opens, then runs `giveBack`. Returns once `take` ran, with the
/// session's task (its error, if any, is the test's).
func holdInAnotherSession(_ url: String, take: [PostgresQuery], giveBack: PostgresQuery, until release: Gate) async throws -> Task<Void, any Error> {
    let client = PostgresClient(configuration: try PostgresURL(Secret(url)).clientConfiguration, backgroundLogger: quietLogger)
    let taken = Gate()
    let session = Task {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            defer { group.cancelAll() }
            defer { taken.open() }
            try await client.withConnection { connection in
                for statement in take { try await connection.query(statement, logger: quietLogger) }
                taken.open()
                await release.wait()
                try await connection.query(giveBack, logger: quietLogger)
            }
        }
    }
    await taken.wait()
    return session
}
