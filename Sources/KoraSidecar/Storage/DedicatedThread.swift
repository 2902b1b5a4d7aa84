import Glibc

/// A thread of its own for work that blocks (SQLite), started without full Foundation's `Thread`.
enum DedicatedThread {
    /// Runs `body` on a new, detached thread named `name` (at most 15 characters, as Linux allows).
    static func start(name: String, _ body: @escaping @Sendable () -> Void) {
        let start = Unmanaged.passRetained(ThreadStart(name: name, body: body)).toOpaque()
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, runThreadStart, start)
        // Only a process out of threads or memory fails here; it could not keep a store anyway.
        precondition(created == 0, "cannot start the \(name) thread (pthread_create: \(created))")
        pthread_detach(thread)
    }
}

/// What a new thread runs: handed to it retained, released by it.
private final class ThreadStart: Sendable {
    let name: String
    let body: @Sendable () -> Void

    init(name: String, body: @escaping @Sendable () -> Void) {
        self.name = name
        self.body = body
    }

    /// Names the calling thread, as `top -H` and `perf` show it (`pthread_setname_np` is not visible to Swift).
    func nameThisThread() {
        let file = open("/proc/thread-self/comm", O_WRONLY)
        guard file >= 0 else { return }
        _ = Array(name.utf8.prefix(15)).withUnsafeBytes { write(file, $0.baseAddress, $0.count) }
        close(file)
    }
}

private func runThreadStart(_ argument: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let start = Unmanaged<ThreadStart>.fromOpaque(argument!).takeRetainedValue()
    start.nameThisThread()
    start.body()
    return nil
}
