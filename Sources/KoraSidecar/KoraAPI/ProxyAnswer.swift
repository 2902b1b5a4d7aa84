import AsyncHTTPClient
import HTTPTypes
import Hummingbird
import NIOCore
import NIOHTTP1

/// Kora's answers on their way back to the calling service: which headers pass, and the body read
/// whole when small or streamed when large.
enum ProxyAnswer {
    /// Kora's response headers passed back to the service.
    static func passedHeaders(_ headers: HTTPHeaders) -> HTTPFields {
        var fields = HTTPFields()
        for (name, value) in headers {
            let lower = name.lowercased()
            let passed =
                lower.hasPrefix("x-ratelimit-")
                // Content-Encoding too: Kora (or a CDN before it) may compress whatever was asked, and
                // the bytes pass unchanged.
                || [
                    "content-type", "content-encoding", "retry-after", "content-disposition", "location", "cache-control", "etag",
                    "last-modified", "x-request-id",
                ].contains(lower)
            if passed, let fieldName = HTTPField.Name(name) { fields.append(HTTPField(name: fieldName, value: value)) }
        }
        return fields
    }

    /// Largest answer of known length passed back as one buffer; longer ones are streamed.
    static let bufferedAnswerBytes = 64 * 1024

    /// Kora's response as the service's response: read whole when it is small (one write, no
    /// streaming machinery), else its body streamed through as it arrives.
    static func passBack(_ response: HTTPClientResponse, head: Bool) async throws(SidecarHTTPError) -> Response {
        let status = HTTPResponse.Status(code: Int(response.status.code), reasonPhrase: response.status.reasonPhrase)
        var headers = passedHeaders(response.headers)
        if head {
            // The length a GET would have, as Kora said it: the empty body would otherwise say 0.
            if let length = response.headers.first(name: "content-length") { headers[.contentLength] = length }
            return Response(status: status, headers: headers, body: .init())
        }
        let length = response.headers.first(name: "content-length").flatMap { Int($0) }
        if let length, length <= bufferedAnswerBytes {
            do {
                return Response(status: status, headers: headers, body: .init(byteBuffer: try await response.body.collect(upTo: length)))
            } catch {
                throw SidecarHTTPError(.badGateway, code: "KORA_UNREACHABLE", message: "Kora's answer could not be read.")
            }
        }
        let body = response.body
        return Response(
            status: status, headers: headers,
            body: ResponseBody(contentLength: length) { writer in
                for try await chunk in body { try await writer.write(chunk) }
                try await writer.finish(nil)
            })
    }
}

extension Response {
    /// This response with `Content-Type` set to `value` (Kora's own), when there is one.
    func withContentType(_ value: String?) -> Response {
        guard let value else { return self }
        var response = self
        response.headers[.contentType] = value
        return response
    }
}
