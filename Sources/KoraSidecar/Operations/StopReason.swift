import KoraSidecarCore
import ServiceLifecycle

extension StartupError {
    /// Why `serve` stopped on `error`, as one sentence that says what to do: never a raw
    /// `ServiceGroupError` dump.
    package static func stopped(by error: any Error) -> StartupError {
        switch error {
        case let error as StartupError:
            error
        case let error as ServiceGroupError where error.errorCode == .serviceFinishedUnexpectedly:
            StartupError("The sidecar stopped because one of its parts ended by itself, which is a bug: the log's last lines say which; please report them.")
        default:
            StartupError("The sidecar stopped: \(error). Check the listeners' addresses and the store, then start it again.")
        }
    }
}
