import HTTPTypes
import Hummingbird
import KoraSidecarCore
import Logging
import NIOCore

/// An error answered with the `{"code": "UPPER_SNAKE", "error": "one sentence"}` shape that Kora's
/// own API uses (SPEC §4.2), so that Kora's SDKs show the message.
package struct SidecarHTTPError: HTTPResponseError, Sendable {
    package var status: HTTPResponse.Status
    package var code: String
    package var message: String
    /// Whether to close the connection instead of reading the rest of the request.
    var closeConnection: Bool
    package var headers: HTTPFields
    /// Why a 503 was answered, for the metric (its `reason`): one code tells an outage from routine.
    var unavailableReason: UnavailableReason?

    package init(_ status: HTTPResponse.Status, code: String, message: String, closeConnection: Bool = false, headers: HTTPFields = [:]) {
        self.status = status
        self.code = code
        self.message = message
        self.closeConnection = closeConnection
        self.headers = headers
    }

    package func response(from request: Request, context: some RequestContext) throws -> Response {
        response(channel: (context as? SidecarRequestContext)?.channel)
    }

    /// The response; when `closeConnection` is set, the connection is closed once it is sent, so
    /// that the rest of an oversized body is never read.
    package func response(channel: (any Channel)?) -> Response {
        var headers = self.headers
        if closeConnection { headers[.connection] = "close" }
        return JSONResponse.make(status, JSONWriter.encode(["code": .string(code), "error": .string(message)]), headers: headers) {
            if closeConnection, let channel { Self.close(channel) }
        }
    }

    /// How long a refused request's client may go on sending before its connection closes whole.
    static let linger = TimeAmount.seconds(2)

    /// Closes a connection whose request was answered unread: its sending side at once, so that the
    /// answer goes out whole and the client sees it end, then the rest after ``linger``, while the
    /// server discards what still arrives. Closed at once with the client's bytes unread, the kernel
    /// resets the connection: a client still sending its body got a reset instead of the answer.
    static func close(_ channel: any Channel) {
        let closed = channel.eventLoop.makePromise(of: Void.self)
        closed.futureResult.whenFailure { _ in channel.close(promise: nil) }
        channel.close(mode: .output, promise: closed)
        let whole = channel.eventLoop.scheduleTask(in: linger) { channel.close(promise: nil) }
        channel.closeFuture.whenComplete { _ in whole.cancel() }
    }

    static func notFound() -> SidecarHTTPError { .init(.notFound, code: "NOT_FOUND", message: "There is nothing at this path.") }

    static func methodNotAllowed(allow: String) -> SidecarHTTPError {
        .init(.methodNotAllowed, code: "METHOD_NOT_ALLOWED", message: "This path accepts \(allow) only.", headers: [.allow: allow])
    }

    static func payloadTooLarge(limit: Int) -> SidecarHTTPError {
        .init(.contentTooLarge, code: "PAYLOAD_TOO_LARGE", message: "The body is larger than \(limit) bytes.", closeConnection: true)
    }

    static func requestTimeout() -> SidecarHTTPError {
        .init(.requestTimeout, code: "REQUEST_TIMEOUT", message: "The body was not received in time.", closeConnection: true)
    }

    static func unavailable(_ message: String, reason: UnavailableReason? = nil) -> SidecarHTTPError {
        var error = SidecarHTTPError(.serviceUnavailable, code: "UNAVAILABLE", message: message, headers: [.retryAfter: "5"])
        error.unavailableReason = reason
        return error
    }

    /// The store could not be read or written: the caller retries, as with any outage.
    static func storeUnavailable() -> SidecarHTTPError { unavailable("The sidecar cannot reach its store; retry later.", reason: .store) }

    /// The listener holds as many bodies as it may (``BodyBudget``); the rest of this one is not read.
    static func busy() -> SidecarHTTPError {
        var busy = unavailable("The sidecar is receiving too much at once; retry later.", reason: .busy)
        busy.closeConnection = true
        return busy
    }

    /// A call still waiting when the sidecar stops: its caller retries (another replica, or this
    /// one once restarted).
    static func stopping() -> SidecarHTTPError { unavailable("The sidecar is stopping; retry the call.") }
}

/// Why a webhook was answered 503: the store failed (an outage), a service refused the event or was
/// held back (direct mode), the same event was being delivered at that moment (Kora's second copy,
/// routine in direct mode), or the listener was receiving too much at once.
enum UnavailableReason: String, Sendable {
    case store, serviceRefused = "service_refused", serviceHeld = "service_held", inFlight = "in_flight", busy
}

/// JSON responses.
package enum JSONResponse {
    /// A response carrying `body` as `application/json`; `afterWrite` runs once it is written.
    package static func make(
        _ status: HTTPResponse.Status, _ body: [UInt8], headers: HTTPFields = [:], afterWrite: (@Sendable () -> Void)? = nil
    ) -> Response {
        var headers = headers
        headers[.contentType] = "application/json"
        // Never read as anything but JSON (a script, a page), whoever loads it.
        headers[contentTypeOptions] = "nosniff"
        let buffer = ByteBuffer(bytes: body)
        guard let afterWrite else {
            return Response(status: status, headers: headers, body: .init(byteBuffer: buffer))
        }
        return Response(
            status: status, headers: headers,
            body: .init(contentLength: buffer.readableBytes) { writer in
                try await writer.write(buffer)
                try await writer.finish(nil)
                afterWrite()
            })
    }

    private static let contentTypeOptions = HTTPField.Name("X-Content-Type-Options")!

    /// A response with a JSON value.
    package static func make(_ status: HTTPResponse.Status, _ value: JSONValue, headers: HTTPFields = [:]) -> Response {
        make(status, JSONWriter.encode(value), headers: headers)
    }
}

/// Reads a request body with a size limit and a time limit, failing before reading further.
package enum BodyReader {
    /// The whole body, at most `limit` bytes. On the sidecar's listeners ``RequestDeadline`` bounds
    /// how long a body may take; a server without it passes `timeout`, after which the connection
    /// is closed.
    /// - Throws: ``SidecarHTTPError`` 413, or 408 when the connection closed before the body ended;
    ///   the connection is then closed.
    /// - Parameter logger: where a refused body is logged (one warning), so an operator sees why a client got 413.
    /// - Parameter budget: the listener's budget for bodies being received, when it has one.
    /// - Parameter throttle: limits the warnings, where anyone can cause them.
    package static func collect(
        _ request: Request, channel: any Channel, limit: Int, timeout: Duration? = nil, budget: BodyBudget? = nil, logger: Logger? = nil,
        throttle: LogThrottle? = nil
    ) async throws(SidecarHTTPError) -> ByteBuffer {
        let held = try await hold(request, channel: channel, limit: limit, timeout: timeout, budget: budget, logger: logger, throttle: throttle)
        held.giveBack()
        return held.body
    }

    /// A body received, with the bytes of its budget it took.
    struct Held {
        let body: ByteBuffer
        fileprivate let taken: Int
        fileprivate let budget: BodyBudget?

        /// Gives the bytes back to the budget: once, when the body is no longer held.
        func giveBack() { if taken > 0 { budget?.give(taken) } }
    }

    /// The whole body, as ``collect(_:channel:limit:timeout:budget:logger:throttle:)``, its bytes
    /// past ``BodyBudget/free`` kept out of `budget` until the caller gives them back: a body the
    /// sidecar holds after receiving it (a proxied upload, until Kora answers) counts for as long
    /// as it is held.
    static func hold(
        _ request: Request, channel: any Channel, limit: Int, timeout: Duration? = nil, budget: BodyBudget?, logger: Logger?,
        throttle: LogThrottle? = nil
    ) async throws(SidecarHTTPError) -> Held {
        do {
            return try await receive(request, channel: channel, limit: limit, timeout: timeout, budget: budget)
        } catch {
            let metadata: Logger.Metadata = [
                "http.path": "\(LoggedPath.masking(request.uri.path))", "http.status": "\(error.status.code)", "error.code": "\(error.code)",
                "limit": "\(limit)",
            ]
            let warn = { (metadata: Logger.Metadata) -> Void in logger?.warning("Request body refused", metadata: metadata) }
            if let throttle { throttle.log(metadata, warn) } else { warn(metadata) }
            throw error
        }
    }

    private static func receive(
        _ request: Request, channel: any Channel, limit: Int, timeout: Duration?, budget: BodyBudget?
    ) async throws(SidecarHTTPError) -> Held {
        if declaresMore(than: limit, request) { throw .payloadTooLarge(limit: limit) }
        // The client waiting for `100 Continue` may send now (asked only by those that wait: the
        // webhook path does not hop to the event loop for it).
        if request.headers[.expect] != nil { channel.triggerUserOutboundEvent(ExpectContinue.Requested(), promise: nil) }
        // A read waiting for bytes does not see cancellation: a client too slow to send its body is
        // disconnected, as nginx does, so that slow clients cannot pile up.
        let timer = timeout.map { timeout in
            channel.eventLoop.scheduleTask(in: .milliseconds(timeout.milliseconds)) { channel.close(promise: nil) }
        }
        defer { timer?.cancel() }
        let held: Held
        do {
            if let budget {
                held = try await collect(request.body, upTo: limit, budget: budget)
            } else {
                held = Held(body: try await request.body.collect(upTo: limit), taken: 0, budget: nil)
            }
        } catch let error as SidecarHTTPError {
            throw error
        } catch is NIOTooManyBytesError {
            throw .payloadTooLarge(limit: limit)
        } catch {
            throw .requestTimeout()
        }
        // A connection closed mid-body ends the body early: there is no request to answer.
        guard channel.isActive else {
            held.giveBack()
            throw .requestTimeout()
        }
        return held
    }

    /// Whether the request's `Content-Length` is over `limit`: refused with 413 before any byte is read.
    static func declaresMore(than limit: Int, _ request: Request) -> Bool {
        request.headers[.contentLength].flatMap { Int($0) }.map { $0 > limit } ?? false
    }

    /// The body, its bytes past ``BodyBudget/free`` taken from `budget` as they arrive; given back
    /// when it cannot be read whole, else by the caller.
    private static func collect(_ body: RequestBody, upTo limit: Int, budget: BodyBudget) async throws -> Held {
        var collected = ByteBuffer()
        var taken = 0
        do {
            for try await chunk in body {
                guard chunk.readableBytes <= limit - collected.readableBytes else { throw NIOTooManyBytesError(maxBytes: limit) }
                // A webhook's few kilobytes cost nothing here, not even the budget's lock.
                let charged = max(0, collected.readableBytes + chunk.readableBytes - max(collected.readableBytes, BodyBudget.free))
                if charged > 0 {
                    guard budget.take(charged) else { throw SidecarHTTPError.busy() }
                    taken += charged
                }
                var chunk = chunk
                collected.writeBuffer(&chunk)
            }
        } catch {
            budget.give(taken)
            throw error
        }
        return Held(body: collected, taken: taken, budget: budget)
    }
}
