import NIOConcurrencyHelpers
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A child process's whole environment: `given`, then `PATH`, then the sanitizer's options (the
/// first of them that sets a name wins).
func childEnvironment(_ given: [String: String], path: String) -> [String: String] {
    given.merging(["PATH": path]) { mine, _ in mine }.merging(Sanitizer.childEnvironment) { mine, _ in mine }
}

/// Runs an executable to completion and returns its exit status and output.
func runTool(
    _ executable: String, _ arguments: [String], environment: [String: String] = [:], input: [UInt8]? = nil, directory: String? = nil
) async throws -> (status: Int32, stdout: String, stderr: String) {
    let scratch = try temporaryDirectory()
    defer { try? FileManager.default.removeItem(atPath: scratch) }
    try Data(input ?? []).write(to: URL(fileURLWithPath: scratch + "/in"))
    let child = try Child(
        executable, arguments, environment: childEnvironment(environment, path: "/usr/sbin:/usr/bin:/sbin:/bin"), directory: directory,
        input: .file(scratch + "/in"), output: .file(scratch + "/out"), error: .file(scratch + "/err"))
    let status = await offPool { child.waitForExit() }
    func read(_ name: String) -> String { (try? String(contentsOfFile: scratch + "/" + name, encoding: .utf8)) ?? "" }
    return (status, read("out"), read("err"))
}

/// A system tool that must succeed (mount, chattr): throws with its error output otherwise.
struct ToolFailed: Error, CustomStringConvertible {
    let description: String
}

func mustRun(_ executable: String, _ arguments: [String]) async throws {
    let result = try await runTool(executable, arguments)
    guard result.status == 0 else { throw ToolFailed(description: "\(executable) \(arguments): \(result.stderr)") }
}

/// Whether this process may mount file systems and set file attributes (the fault tests need root).
let runningAsRoot = geteuid() == 0

/// A real tmpfs of a few megabytes on a fresh temporary directory: its disk can be filled for real.
struct TinyFilesystem {
    let path: String
    private var filler: String { path + "/filler" }

    static func mount(megabytes: Int) async throws -> TinyFilesystem {
        let path = try temporaryDirectory()
        try await mustRun("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=\(megabytes)m", "tmpfs", path])
        return TinyFilesystem(path: path)
    }

    /// Writes a file until the file system answers ENOSPC.
    func fill() throws {
        let fd = open(filler, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw ToolFailed(description: "cannot create \(filler)") }
        defer { close(fd) }
        let block = [UInt8](repeating: 0, count: 65536)
        while block.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) > 0 {}
        guard errno == ENOSPC else { throw ToolFailed(description: "filling \(path) stopped with errno \(errno)") }
    }

    /// Frees what ``fill()`` took.
    func free() throws { try FileManager.default.removeItem(atPath: filler) }

    /// Unmounts (lazily, in case a killed child still holds a file) and removes the directory.
    func unmount() async {
        _ = try? await runTool("/usr/bin/umount", ["-l", path])
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// A small ext4 file system in a file, mounted through a loop device, that can be frozen
/// (`fsfreeze`): every write to it then waits until it is thawed, as on a stalled network volume.
struct FreezableFilesystem {
    let path: String
    private var image: String { path + ".img" }

    static func mount() async throws -> FreezableFilesystem {
        let path = try temporaryDirectory()
        let disk = FreezableFilesystem(path: path)
        try await mustRun("/usr/bin/truncate", ["-s", "32M", disk.image])
        try await mustRun("/usr/sbin/mkfs.ext4", ["-q", "-F", disk.image])
        try await mustRun("/usr/bin/mount", ["-o", "loop", disk.image, path])
        return disk
    }

    func freeze(_ frozen: Bool) async throws {
        try await mustRun("/usr/sbin/fsfreeze", [frozen ? "--freeze" : "--unfreeze", path])
    }

    /// Thaws (a failed test may have left it frozen), unmounts and removes it.
    func unmount() async {
        _ = try? await runTool("/usr/sbin/fsfreeze", ["--unfreeze", path])
        _ = try? await runTool("/usr/bin/umount", ["-l", path])
        try? FileManager.default.removeItem(atPath: path)
        try? FileManager.default.removeItem(atPath: image)
    }
}

/// Makes `paths` immutable (`chattr +i`): the kernel refuses every write to them, even root's.
func setImmutable(_ immutable: Bool, _ paths: [String]) async throws {
    try await mustRun("/usr/bin/chattr", [immutable ? "+i" : "-i"] + paths)
}

/// A TCP peer on 127.0.0.1 that accepts every connection and then either holds it open without
/// reading or answering (a hung process), or resets it at once (RST).
final class SilentPeer: @unchecked Sendable {
    enum Behaviour { case hold, reset }
    let port: Int
    private let listener: RawListener
    private let held = Connections()

    /// How many connections it accepted.
    var accepted: Int { held.list.withLockedValue { $0.count } }

    private final class Connections: Sendable {
        let list = NIOLockedValueBox<[Int32]>([])
    }

    init(_ behaviour: Behaviour) throws {
        listener = try RawListener()
        port = listener.port
        let fd = listener.fd
        listen(fd, 128)
        Thread { [held] in
            while true {
                let connection = accept(fd, nil, nil)
                if connection < 0 { return }
                if behaviour == .reset {
                    var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
                    setsockopt(connection, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
                    close(connection)
                    held.list.withLockedValue { $0.append(-1) }
                } else {
                    held.list.withLockedValue { $0.append(connection) }
                }
            }
        }.start()
    }

    deinit {
        shutdown(listener.fd, Int32(SHUT_RDWR))
        for fd in held.list.withLockedValue({ $0 }) where fd >= 0 { close(fd) }
    }
}
