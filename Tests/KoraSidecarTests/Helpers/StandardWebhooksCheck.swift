import Foundation

/// Verifies a delivery with the Standard Webhooks reference library for Python (`standardwebhooks`
/// on PyPI), an implementation independent of ours. Returns the library's verdict and message.
func verifyWithReferenceLibrary(secret: String, delivery: ReceivedDelivery) throws -> (ok: Bool, output: String) {
    let directory = try temporaryDirectory()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try Data(delivery.body).write(to: URL(fileURLWithPath: directory + "/body"))
    let script = """
        import sys
        from standardwebhooks.webhooks import Webhook
        body = open(sys.argv[1], 'rb').read()
        headers = {'webhook-id': sys.argv[2], 'webhook-timestamp': sys.argv[3], 'webhook-signature': sys.argv[4]}
        try:
            Webhook(sys.argv[5]).verify(body, headers)
            print('verified')
        except Exception as error:
            print('rejected:', error)
            sys.exit(1)
        """
    let child = try Child(
        "/usr/bin/env",
        [
            "python3", "-c", script, directory + "/body", delivery.header("webhook-id") ?? "", delivery.header("webhook-timestamp") ?? "",
            delivery.header("webhook-signature") ?? "", secret,
        ],
        environment: ProcessInfo.processInfo.environment, output: .file(directory + "/out"), error: .sameAsOutput)
    let status = child.waitForExit()
    return (status == 0, (try? String(contentsOfFile: directory + "/out", encoding: .utf8)) ?? "")
}
