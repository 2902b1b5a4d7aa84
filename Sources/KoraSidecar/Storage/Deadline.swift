import KoraSidecarCore
import NIOConcurrencyHelpers

/// Runs work with a deadline that does not wait for the work to notice it: when time is up the
/// caller gets the deadline's error at once and the work is cancelled in the background. A database
/// lease that ignores cancellation can then not hold a webhook, a worker or shutdown hostage.
final class Deadline<T: Sendable>: Sendable {
    private let waiting: NIOLockedValueBox<CheckedContinuation<T, any Error>?>
    private let work = NIOLockedValueBox<Task<Void, Never>?>(nil)

    private init(_ continuation: CheckedContinuation<T, any Error>) { waiting = NIOLockedValueBox(continuation) }

    static func run(
        after timeout: Duration, error: @escaping @Sendable () -> any Error, _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let deadline = Deadline(continuation)
            let timer = Task {
                guard (try? await Task.sleep(for: timeout)) != nil else { return }
                deadline.finish(.failure(error()))
                deadline.work.withLockedValue { $0 }?.cancel()
            }
            let work = Task {
                let result: Result<T, any Error>
                do { result = .success(try await body()) } catch { result = .failure(error) }
                timer.cancel()
                deadline.finish(result)
            }
            deadline.work.withLockedValue { $0 = work }
        }
    }

    /// Resumes the caller with the first result; later ones are dropped.
    private func finish(_ result: Result<T, any Error>) {
        waiting.withLockedValue { $0.take() }?.resume(with: result)
    }
}
