import Foundation
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A child process started with `posix_spawn`. Foundation's `Process.run()` crashes now and then on
/// Linux (Swift 6.3.1: it copies a whole `dirent` name while listing `/proc/self/fd` and reads past
/// the end of glibc's buffer, swift-corelibs-foundation#5472), which took down a whole test run; the
/// tests spawn many children, so none of them goes through it.
///
/// The child inherits nothing but its standard streams (`closefrom(3)`), so a test's sockets never
/// outlive it in a child.
final class Child: @unchecked Sendable {
    /// Where a standard stream of the child goes.
    enum Stream {
        /// `/dev/null`.
        case null
        /// A file, created or truncated (output) or read (input).
        case file(String)
        /// A pipe whose other end the parent reads (output only): ``outputPipe``.
        case pipe
        /// Wherever standard output goes (standard error only).
        case sameAsOutput
    }

    let pid: pid_t
    /// The parent's end of the pipe given as `.pipe` for standard output or error, if any.
    let outputPipe: Int32?
    private let exit = NIOLockedValueBox<Int32?>(nil)

    /// Starts `executable` with `arguments`, exactly `environment`, in `directory` (or the tests' own).
    init(
        _ executable: String, _ arguments: [String], environment: [String: String], directory: String? = nil,
        input: Stream = .null, output: Stream = .null, error: Stream = .null
    ) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var pipeEnds: [Int32] = [-1, -1]
        if case .pipe = output { try Self.makePipe(&pipeEnds) }
        if case .pipe = error { try Self.makePipe(&pipeEnds) }
        for (fd, stream) in [(Int32(0), input), (1, output), (2, error)] {
            switch stream {
            case .null: posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
            case .file(let path): posix_spawn_file_actions_addopen(&actions, fd, path, fd == 0 ? O_RDONLY : O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            case .pipe: posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], fd)
            case .sameAsOutput: posix_spawn_file_actions_adddup2(&actions, 1, fd)
            }
        }
        _ = GNUSpawn.closeFrom(&actions, 3)
        if let directory { _ = GNUSpawn.changeDirectory(&actions, directory) }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid = pid_t()
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, envp)
        if pipeEnds[1] >= 0 { close(pipeEnds[1]) }
        guard spawned == 0 else {
            if pipeEnds[0] >= 0 { close(pipeEnds[0]) }
            throw ToolFailed(description: "\(executable) cannot start: \(String(cString: strerror(spawned)))")
        }
        self.pid = pid
        self.outputPipe = pipeEnds[0] >= 0 ? pipeEnds[0] : nil
    }

    deinit { if let outputPipe { close(outputPipe) } }

    /// The exit status once the child ended (the signal's number when a signal ended it, as
    /// Foundation's `terminationStatus` has it), else nil.
    var exitStatus: Int32? {
        exit.withLockedValue { status in
            if status == nil {
                var raw: Int32 = 0
                if waitpid(pid, &raw, WNOHANG) == pid { status = Self.decode(raw) }
            }
            return status
        }
    }

    var isRunning: Bool { exitStatus == nil }

    /// Blocks until the child ends; call it off the cooperative pool.
    func waitForExit() -> Int32 {
        if let status = exitStatus { return status }
        var raw: Int32 = 0
        while waitpid(pid, &raw, 0) < 0, errno == EINTR {}
        let status = Self.decode(raw)
        exit.withLockedValue { $0 = $0 ?? status }
        return status
    }

    func signal(_ number: Int32) { kill(pid, number) }

    /// A pipe whose ends close on exec (only the child's dup2'd copy survives into it).
    private static func makePipe(_ ends: inout [Int32]) throws {
        guard ends[0] < 0 else { return }
        guard pipe(&ends) == 0 else { throw ToolFailed(description: "pipe: \(String(cString: strerror(errno)))") }
        for fd in ends { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    }

    private static func decode(_ raw: Int32) -> Int32 {
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import as functions.
        let signal = raw & 0x7F
        return signal == 0 ? (raw >> 8) & 0xFF : signal
    }
}

/// glibc's `posix_spawn_file_actions_addclosefrom_np` (2.34) and `_addchdir_np` (2.29), which the
/// Swift Glibc module does not import (they need `_GNU_SOURCE`): looked up once by name.
private enum GNUSpawn {
    typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    typealias ChangeDirectory = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32

    static let closeFrom: CloseFrom = unsafeBitCast(symbol("posix_spawn_file_actions_addclosefrom_np"), to: CloseFrom.self)
    static let changeDirectory: ChangeDirectory = unsafeBitCast(symbol("posix_spawn_file_actions_addchdir_np"), to: ChangeDirectory.self)

    private static func symbol(_ name: String) -> UnsafeMutableRawPointer {
        guard let found = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else { fatalError("glibc lacks \(name)") }
        return found
    }
}
