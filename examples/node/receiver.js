// Receives kora-sidecar's deliveries: checks the Standard Webhooks signature with node:crypto alone.
// WEBHOOK_SECRET=whsec_... PORT=3000 node receiver.js   (PORT=0 picks a free port; SOCKET=/path listens on a Unix socket)
'use strict';
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');

const key = Buffer.from(process.env.WEBHOOK_SECRET.replace(/^whsec_/, ''), 'base64');
const seen = new Set(); // Delivery is at least once. Production code keeps these ids in its database (a unique key).

function verified(headers, body) { // body: the raw bytes, never re-serialised JSON
  const id = headers['webhook-id'], timestamp = headers['webhook-timestamp'] || '', signatures = headers['webhook-signature'] || '';
  if (!id || !/^\d+$/.test(timestamp) || Math.abs(Date.now() / 1000 - Number(timestamp)) > 300) return false;
  const expected = crypto.createHmac('sha256', key).update(`${id}.${timestamp}.`).update(body).digest();
  return signatures.split(' ').some((entry) => { // several "v1,<base64>" during a secret rotation
    const [version, value = ''] = entry.split(','), given = Buffer.from(value, 'base64');
    return version === 'v1' && given.length === expected.length && crypto.timingSafeEqual(given, expected);
  });
}

const server = http.createServer((request, response) => {
  const chunks = [];
  request.on('data', (chunk) => chunks.push(chunk));
  request.on('end', () => {
    const body = Buffer.concat(chunks), id = request.headers['webhook-id'];
    if (request.method !== 'POST' || !verified(request.headers, body)) return response.writeHead(401).end();
    let event;
    try { event = JSON.parse(body); } catch { return response.writeHead(400).end(); }
    if (seen.has(id)) { console.log(`duplicate ${id}`); return response.writeHead(204).end(); }
    seen.add(id);
    console.log(`verified ${id} ${event.type} ${event.verification ? event.verification.outcome : '-'}`);
    response.writeHead(204).end(); // answer fast: hand slow work to a queue rather than doing it here
  });
});
const socket = process.env.SOCKET;
// A socket file left by a killed run (a pod's emptyDir outlives a restart) makes listen fail with
// EADDRINUSE: remove it, unless a live receiver still answers on it.
server.on('error', (error) => {
  if (error.code !== 'EADDRINUSE' || !socket || !fs.lstatSync(socket).isSocket()) throw error;
  net.connect(socket)
    .on('connect', () => { console.error(`another process listens on ${socket}`); process.exit(1); })
    .on('error', () => { fs.unlinkSync(socket); server.listen(socket); });
});
server.listen(socket || { host: '127.0.0.1', port: Number(process.env.PORT || 3000) }, () => {
  if (socket) fs.chmodSync(socket, 0o660); // the sidecar runs as another user in this group: it must write
  console.log(socket ? `listening unix:${socket}` : `listening 127.0.0.1:${server.address().port}`);
});
