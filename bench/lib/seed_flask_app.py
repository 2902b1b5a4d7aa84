"""The webhook handler of Kora's server integration guide (its Flask example), reduced to what
bench/run compares: verify the signature, answer 200. For the "Flask + gunicorn" row only.

The guide's handler checks `X-Kora-Signature` against the lowercase hex HMAC-SHA256 of the raw
request body under the webhook secret, with a constant-time comparison, answers 401 with a JSON
error when they differ, and {"received": true} otherwise. Kept here: exactly that. Left out: the
guide's JSON parsing and print() per event type, and everything the sidecar adds (a timestamp
window, de-duplication, normalisation, signing and delivering to the application). So this row is a
lower bound on what the guide's handler costs, and the sidecar rows do strictly more work.

Run by bench/run as: gunicorn --chdir bench/lib seed_flask_app:app (secret in
KORAIDV_WEBHOOK_SECRET).
"""
import hashlib
import hmac
import os

from flask import Flask, jsonify, request

app = Flask(__name__)
WEBHOOK_SECRET = os.environ["KORAIDV_WEBHOOK_SECRET"].encode()


@app.post("/webhooks/koraidv")
def webhook():
    signature = request.headers.get("X-Kora-Signature", "")
    expected = hmac.new(WEBHOOK_SECRET, request.get_data(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature, expected):
        return jsonify({"error": "Invalid signature"}), 401
    return jsonify({"received": True})
