import HTTPTypes
import Hummingbird
import NIOCore

/// `GET /admin/` and its two files: the delivery console, embedded in the binary. They are served
/// without the admin token (the page asks for it and keeps it in the browser's session storage);
/// every call the page makes goes through the admin API and its token.
func addConsoleRoutes(to router: Router<SidecarRequestContext>) {
    let files: [(path: String, type: String, bytes: [UInt8])] = [
        ("/admin/", "text/html; charset=utf-8", PackageResources.index_html),
        ("/admin/console.css", "text/css; charset=utf-8", PackageResources.console_css),
        ("/admin/console.js", "text/javascript; charset=utf-8", PackageResources.console_js),
    ]
    for file in files {
        let body = ByteBuffer(bytes: file.bytes)
        let headers: HTTPFields = [
            .contentType: file.type,
            .cacheControl: "no-store",
            .contentSecurityPolicy: ConsoleHeaders.contentSecurityPolicy,
            HTTPField.Name("X-Content-Type-Options")!: "nosniff",
            HTTPField.Name("Referrer-Policy")!: "no-referrer",
            HTTPField.Name("X-Frame-Options")!: "DENY",
            // A page that opened the console cannot keep a handle on its window (and change its address).
            HTTPField.Name("Cross-Origin-Opener-Policy")!: "same-origin",
        ]
        router.get(RouterPath(file.path)) { _, _ in Response(status: .ok, headers: headers, body: .init(byteBuffer: body)) }
    }
}

enum ConsoleHeaders {
    /// Only the console's own files and its own origin: no inline script or style, no frames, no forms posting elsewhere.
    static let contentSecurityPolicy =
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        + "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
}
