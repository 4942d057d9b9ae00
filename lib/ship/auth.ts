/**
 * Shared-key authentication of ship and receive: both sides prove they hold the key with an
 * HMAC-SHA256 over fresh nonces from both sides, so the key never crosses the wire and a recorded
 * handshake cannot be replayed (the receiver's nonce is new on every connection).
 *
 * ```text
 * proofC = HMAC(key, "sectorlog-client" ‖ nonceS ‖ nonceC ‖ hostId)   client → server
 * proofS = HMAC(key, "sectorlog-server" ‖ nonceC ‖ nonceS ‖ hostId)   server → client
 * ```
 *
 * @module
 */
import { UsageError } from "../errors.ts";

/** Bytes of each side's nonce. */
export const NONCE_BYTES = 32;
/** Shortest key accepted (after trimming surrounding whitespace). */
export const KEY_BYTES_MIN = 16;
/** Longest key file read. */
export const KEY_FILE_BYTES_MAX = 4096;

const CLIENT_LABEL = "sectorlog-client";
const SERVER_LABEL = "sectorlog-server";

/** A loaded shared key, ready to make and check proofs. */
export interface ShipKey {
  /** The file it came from, for messages. */
  path: string;
  cryptoKey: CryptoKey;
}

/**
 * Reads a key file: its bytes, without surrounding whitespace, are the key. Refuses missing,
 * oversized and too short files with a {@linkcode UsageError} naming the file.
 *
 * @example
 * ```ts
 * import { loadKeyFile } from "./auth.ts";
 * const key = await loadKeyFile("/etc/sectorlog/ship.key");
 * ```
 */
export async function loadKeyFile(path: string): Promise<ShipKey> {
  let bytes: Uint8Array;
  try {
    const stat = await Deno.stat(path);
    if (!stat.isFile || stat.size > KEY_FILE_BYTES_MAX) {
      throw new UsageError(
        `Invalid --key-file ${path}: expected a file of at most ${KEY_FILE_BYTES_MAX} bytes`,
      );
    }
    bytes = await Deno.readFile(path);
  } catch (error) {
    if (error instanceof UsageError) throw error;
    throw new UsageError(`Cannot read --key-file ${path}: ${(error as Error).message}`, {
      cause: error,
    });
  }
  const key = trimAsciiWhitespace(bytes);
  if (key.length < KEY_BYTES_MIN) {
    throw new UsageError(
      `Invalid --key-file ${path}: the key is ${key.length} bytes, at least ${KEY_BYTES_MIN} are needed`,
      { hint: `make one with: head -c 32 /dev/urandom | base64 > ${path}` },
    );
  }
  const cryptoKey = await crypto.subtle.importKey(
    "raw",
    key.slice(),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  return { path, cryptoKey };
}

function trimAsciiWhitespace(bytes: Uint8Array): Uint8Array {
  const isSpace = (b: number) => b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;
  let start = 0;
  let end = bytes.length;
  while (start < end && isSpace(bytes[start])) start++;
  while (end > start && isSpace(bytes[end - 1])) end--;
  return bytes.subarray(start, end);
}

/** A fresh random nonce. */
export function makeNonce(): Uint8Array {
  return crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
}

/** The client's proof of the key. */
export function clientProof(
  key: ShipKey,
  nonces: { server: Uint8Array; client: Uint8Array },
  hostId: string,
): Promise<Uint8Array> {
  return hmac(key, CLIENT_LABEL, nonces.server, nonces.client, hostId);
}

/** The server's proof of the key. */
export function serverProof(
  key: ShipKey,
  nonces: { server: Uint8Array; client: Uint8Array },
  hostId: string,
): Promise<Uint8Array> {
  return hmac(key, SERVER_LABEL, nonces.client, nonces.server, hostId);
}

async function hmac(
  key: ShipKey,
  label: string,
  first: Uint8Array,
  second: Uint8Array,
  hostId: string,
): Promise<Uint8Array> {
  const encoder = new TextEncoder();
  const labelBytes = encoder.encode(label);
  const hostBytes = encoder.encode(hostId);
  const message = new Uint8Array(
    labelBytes.length + first.length + second.length + hostBytes.length,
  );
  let offset = 0;
  for (const part of [labelBytes, first, second, hostBytes]) {
    message.set(part, offset);
    offset += part.length;
  }
  return new Uint8Array(await crypto.subtle.sign("HMAC", key.cryptoKey, message));
}

/** Compares two byte strings in time that depends only on their lengths. */
export function constantTimeEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let difference = 0;
  for (let i = 0; i < a.length; i++) difference |= a[i] ^ b[i];
  return difference === 0;
}

/** Lowercase hex of `bytes`. */
export function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Bytes of a lowercase or uppercase hex string of exactly `bytes` bytes, or undefined. */
export function fromHex(text: unknown, bytes: number): Uint8Array | undefined {
  if (typeof text !== "string" || text.length !== bytes * 2 || !/^[0-9a-fA-F]*$/.test(text)) {
    return undefined;
  }
  const out = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) out[i] = parseInt(text.slice(i * 2, i * 2 + 2), 16);
  return out;
}
