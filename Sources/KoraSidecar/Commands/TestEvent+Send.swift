import AsyncHTTPClient
import KoraSidecarCore
import NIOCore

extension TestEvent {
    /// Signs `body` under `scheme` and posts it to `url`; returns Kora's view: status and body.
    package static func send(
        body: [UInt8], to url: String, secret: Secret, scheme: SignatureScheme, timestamp: Int64 = UnixTime.now().seconds
    ) async throws -> (status: Int, body: String) {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        for header in KoraSignature.headers(scheme: scheme, secret: secret, body: body, timestamp: timestamp) {
            request.headers.add(name: header.name, value: header.value)
        }
        if case .object(let members)? = try? JSONParser.parse(body), let id = members.first(where: { $0.key == "id" })?.value.text {
            request.headers.add(name: "X-Webhook-ID", value: id)
        }
        request.body = .bytes(ByteBuffer(bytes: body))
        // A client of its own that tries to connect once: the shared one retries a refused connection
        // until the whole deadline, silent for 30 s at a wrong port.
        var configuration = HTTPClient.Configuration(timeout: .init(connect: .seconds(5)))
        configuration.connectionPool.retryConnectionEstablishment = false
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        do {
            let response = try await client.execute(request, timeout: .seconds(30))
            let answer = try await response.body.collect(upTo: 1 << 20)
            try await client.shutdown()
            return (Int(response.status.code), String(buffer: answer))
        } catch {
            try? await client.shutdown()
            throw error
        }
    }
}
