import Crypto
import HTTPTypes
import Hummingbird
import KoraSidecar
import KoraSidecarCore
import NIOCore

/// What the stand-in hands out about a verification besides its JSON: signed image URLs and the
/// compliance report (KORA.md §2).
extension KoraSimulator {
    /// How long a signed image URL stays valid (KORA.md: 15 minutes).
    static let imageURLLifetime = Duration.seconds(15 * 60)

    /// The image types, by the upload they come from (`POST /verifications/{id}/document/back` gives
    /// `document_back`). KORA.md names no types: this is our reading.
    static let imageTypes: [(type: String, upload: String)] = [("document", "document"), ("document_back", "document/back"), ("selfie", "selfie")]

    /// `GET /verifications/{id}/images` (every uploaded image) or `/images/{type}` (one): signed URLs
    /// pointing at the stand-in itself, valid 15 minutes. 404 for an unknown verification or an image
    /// that was not uploaded.
    func imagesRoute(_ request: Request, id: String?, type: String?) throws -> Response {
        guard let id, verification(id) != nil else { throw Self.notFound }
        let uploaded = uploads(of: id)
        let expires = configuration.clock().adding(Self.imageURLLifetime)
        // The address the caller reached the stand-in at; through the sidecar, the stand-in's own (as
        // Kora's signed URLs point at its storage, not back through the proxy).
        let authority = request.head.authority ?? "\(configuration.host):\(configuration.port)"
        let images: [JSONValue] = Self.imageTypes.filter { uploaded[$0.upload] != nil && (type == nil || $0.type == type) }.map { image in
            [
                "type": .string(image.type),
                "url": .string("http://\(authority)\(Self.signedPath(id: id, type: image.type, expires: expires.seconds, key: imageURLKey))"),
                "expiresAt": .string(expires.iso8601Seconds),
            ]
        }
        if let type {
            guard case .object(let members)? = images.first else {
                throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "No \(type) image for this verification")
            }
            return JSONResponse.make(.ok, .object([JSONMember("verificationId", .string(id))] + members))
        }
        return JSONResponse.make(.ok, ["verificationId": .string(id), "images": .array(images)])
    }

    /// Where a signed URL points: `/signed/images/{id}/{type}?expires=…&signature=…`.
    static func signedPath(id: String, type: String, expires: Int64, key: SymmetricKey) -> String {
        "/signed/images/\(id)/\(type)?expires=\(expires)&signature=\(imageSignature(id: id, type: type, expires: expires, key: key))"
    }

    static func imageSignature(id: String, type: String, expires: Int64, key: SymmetricKey) -> String {
        Hex.encode(HMAC<SHA256>.authenticationCode(for: Array("\(id)/\(type)/\(expires)".utf8), using: key))
    }

    /// `GET /signed/images/{id}/{type}`: what a signed URL serves while it is valid, without an API
    /// key (as a storage URL needs none). The stand-in keeps only the size and digest of uploads, so
    /// it serves a 1×1 placeholder PNG; 403 once expired or when the signature does not match.
    func signedImageRoute(_ request: Request, id: String?, type: String?) -> Response {
        let query = request.uri.queryParameters
        guard let id, let type, let expires = query["expires"].flatMap({ Int64(String($0)) }), let signature = query["signature"],
            ConstantTime.equal(Array(signature.utf8), Array(Self.imageSignature(id: id, type: type, expires: expires, key: imageURLKey).utf8)),
            configuration.clock().seconds < expires
        else {
            return JSONResponse.make(.forbidden, ["code": "FORBIDDEN", "error": "The signed URL is invalid or has expired"])
        }
        return Response(status: .ok, headers: [.contentType: "image/png"], body: .init(byteBuffer: ByteBuffer(bytes: Self.placeholderPNG)))
    }

    /// A valid 1×1 grey PNG.
    static let placeholderPNG: [UInt8] = [
        0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00, 0x01,
        0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x3A, 0x7E, 0x9B, 0x55, 0x00, 0x00, 0x00, 0x0A, 0x49, 0x44, 0x41,
        0x54, 0x78, 0x9C, 0x63, 0x68, 0x00, 0x00, 0x00, 0x82, 0x00, 0x81, 0x77, 0xCD, 0x72, 0xB6, 0x00, 0x00, 0x00, 0x00, 0x49,
        0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
    ]

    /// `GET /verifications/{id}/report`: the compliance report as a PDF, 404 for an unknown verification.
    func reportRoute(id: String?) throws -> Response {
        guard let id, let verification = state.withLockedValue({ $0.verifications[id] }) else { throw Self.notFound }
        let pdf = ComplianceReport.pdf(verification)
        return Response(
            status: .ok,
            headers: [.contentType: "application/pdf", .contentDisposition: "attachment; filename=\"\(id)-report.pdf\""],
            body: .init(byteBuffer: ByteBuffer(bytes: pdf)))
    }
}

/// The compliance report of a verification: a one-page PDF with its status, decision and scores,
/// and a document-image placeholder. Kora's reports carry the document images and run to hundreds of
/// KB; the placeholder makes this one over 64 KiB too, so that the sidecar's proxy streams it as it
/// would a real one (answers up to 64 KiB are passed back in one piece). The same verification state
/// gives the same bytes.
enum ComplianceReport {
    /// The placeholder image: 8-bit grey, `width` × `height` bytes.
    static let width = 256
    static let height = 300

    static func pdf(_ verification: SimulatedVerification) -> [UInt8] {
        let lines = [
            "Kora IDV compliance report (kora-sidecar simulate)",
            "Verification: \(verification.id)", "External id: \(verification.externalID)", "Tenant: \(verification.tenantID)",
            "Tier: \(verification.tier)", "Status: \(verification.status)", "Decision: \(verification.decision ?? "none")",
            "Reason: \(verification.decisionReason ?? "none")", "Overall score: \(verification.overallScore ?? "none")",
            "Created: \(verification.createdAt.iso8601Seconds)", "Updated: \(verification.updatedAt.iso8601Seconds)",
        ]
        var text = "BT /F1 11 Tf 50 790 Td 14 TL\n"
        for line in lines { text += "(\(escaped(line))) '\n" }
        text += "ET\nq \(width) 0 0 \(height) 50 400 cm /Im1 Do Q\n"
        let content = Array(text.utf8)
        // Every byte value occurs, so that a proxy that altered bytes (as text) would show.
        let image = (0..<(width * height)).map { UInt8(truncatingIfNeeded: ($0 % width) ^ ($0 / width)) }

        let objects: [[UInt8]] = [
            Array("<< /Type /Catalog /Pages 2 0 R >>".utf8),
            Array("<< /Type /Pages /Kids [3 0 R] /Count 1 >>".utf8),
            Array(
                ("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 5 0 R"
                    + " /Resources << /Font << /F1 4 0 R >> /XObject << /Im1 6 0 R >> >> >>").utf8),
            Array("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".utf8),
            stream([:], content),
            stream(
                ["/Type": "/XObject", "/Subtype": "/Image", "/Width": "\(width)", "/Height": "\(height)", "/ColorSpace": "/DeviceGray",
                 "/BitsPerComponent": "8"], image),
        ]
        var pdf = Array("%PDF-1.4\n%".utf8) + [0xE2, 0xE3, 0xCF, 0xD3, 0x0A]
        var offsets: [Int] = []
        for (index, object) in objects.enumerated() {
            offsets.append(pdf.count)
            pdf += Array("\(index + 1) 0 obj\n".utf8) + object + Array("\nendobj\n".utf8)
        }
        let xref = pdf.count
        // Each cross-reference entry is exactly 20 bytes, its offset ten digits.
        var table = "xref\n0 \(objects.count + 1)\n0000000000 65535 f \n"
        for offset in offsets { table += String(repeating: "0", count: 10 - String(offset).count) + "\(offset) 00000 n \n" }
        table += "trailer\n<< /Size \(objects.count + 1) /Root 1 0 R >>\nstartxref\n\(xref)\n%%EOF\n"
        return pdf + Array(table.utf8)
    }

    /// A stream object: `entries` and its `/Length`, then the bytes.
    private static func stream(_ entries: KeyValuePairs<String, String>, _ bytes: [UInt8]) -> [UInt8] {
        let dictionary = entries.map { "\($0.key) \($0.value) " }.joined() + "/Length \(bytes.count)"
        return Array("<< \(dictionary) >>\nstream\n".utf8) + bytes + Array("\nendstream".utf8)
    }

    /// `text` as the inside of a PDF literal string: printable ASCII, with `\`, `(` and `)` escaped.
    static func escaped(_ text: String) -> String {
        var result = ""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\\", "(", ")": result += "\\" + String(scalar)
            case " "..."~": result.unicodeScalars.append(scalar)
            default: result += "?"
            }
        }
        return result
    }
}
