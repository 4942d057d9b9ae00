/**
 * The receiving end of ship: a TCP (or TLS) server that keeps one logdir per host in a store
 * directory. Each connection is a session for one host; sessions run independently, so a slow or
 * misbehaving host never stalls the others. Every limit is named and enforced: frame bytes,
 * handshake time, idle time, total connections, one session per host.
 *
 * @module
 */
import { BusyError, IntegrityError } from "../errors.ts";
import {
  decodeEntryHeader,
  encodeEntryHeader,
  ENTRY_FORMAT_VERSION,
  ENTRY_HEADER_BYTES,
  type EntryHeader,
  payloadMatches,
} from "../format/entry.ts";
import { MANIFEST_FORMAT_VERSION } from "../format/manifest.ts";
import { formatTimeUtc } from "../time.ts";
import {
  type ClientHello,
  hostIdProblem,
  parseClientHello,
  parseStateBegin,
  PROTOCOL_NAME,
  type StoreState,
} from "./_messages.ts";
import {
  clientProof,
  constantTimeEqual,
  fromHex,
  makeNonce,
  NONCE_BYTES,
  serverProof,
  type ShipKey,
  toHex,
} from "./auth.ts";
import { HostStore, type StateInstall } from "./host_store.ts";
import {
  closeQuietly,
  CONTROL_BYTES_MAX,
  decodeChunkBody,
  decodeJsonBody,
  decompressChunk,
  encodeJsonFrame,
  type ErrorCode,
  type Frame,
  FRAME_BYTES_MAX,
  FRAME_TYPES,
  FrameReader,
  frameTypeName,
  PROTOCOL_VERSION,
  ProtocolError,
  STATE_BEGIN_BYTES_MAX,
  writeAll,
} from "./wire.ts";

/** Longest a client may take from connecting to a completed handshake. */
export const RECEIVE_HANDSHAKE_MS_MAX = 10_000;
/** A connection with no frame for this long is closed (senders ping well before). */
export const RECEIVE_IDLE_MS_MAX = 120_000;
/** Most connections served at once, over all hosts. */
export const RECEIVE_CONNECTIONS_MAX = 64;
/** How long a new session waits for the same host's previous session to end before "busy". */
const BUSY_WAIT_MS = 2_000;
/**
 * How long a new session waits for a host copy's lock that another process holds for a moment
 * (an upload round's or a compaction's seal, which can take seconds on a loaded machine).
 */
const HOST_LOCK_WAIT_MS = 10_000;
/** How often a session retries that lock within HOST_LOCK_WAIT_MS. */
const BUSY_RETRY_MS = 50;
/** Longest the receiver waits to deliver an ERROR frame to a peer it is refusing. */
const REFUSAL_WRITE_MS_MAX = 2_000;

/** The receiver's limits; tests shrink them. */
export interface ReceiverLimits {
  frameBytesMax: number;
  handshakeMsMax: number;
  idleMsMax: number;
  connectionsMax: number;
}

/** Severity of a {@linkcode ReceiverEvent}. */
export type ReceiverEventLevel = "debug" | "info" | "warn" | "error";

/** One thing that happened in the receiver, for the caller to print. */
export interface ReceiverEvent {
  level: ReceiverEventLevel;
  /** Sentence-case description naming the host, peer and limit involved. */
  message: string;
  /** The connection, numbered from 1 in accept order. */
  connectionId?: number;
  /** The peer's address, `host:port`. */
  remote?: string;
  hostId?: string;
  error?: unknown;
}

/** Options of {@linkcode Receiver.start}. */
export interface ReceiverOptions {
  /** Where each host's logdir lives: `storedir/<hostId>/`. Created if missing. */
  storedir: string;
  hostname?: string;
  /** TCP port; 0 picks a free one (read it from {@linkcode Receiver.addr}). */
  port: number;
  /** Require senders to prove this key (and prove it to them). */
  key?: ShipKey;
  /** Serve TLS with this certificate chain and private key (PEM text). */
  tls?: { certPem: string; keyPem: string };
  /** Accept only these host ids (default: any valid one). */
  allowHosts?: string[];
  limits?: Partial<ReceiverLimits>;
  /** Seal each host's live segment at this size (default: the logdir default). */
  segmentBytesMax?: number;
  /** Receives events; must not throw. */
  onEvent?: (event: ReceiverEvent) => void;
}

/**
 * A running receiver.
 *
 * @example
 * ```ts
 * import { Receiver } from "./receiver.ts";
 * const receiver = await Receiver.start({ storedir: "/srv/sectorlog", port: 7420,
 *   onEvent: (event) => console.error(event.message) });
 * Deno.addSignalListener("SIGTERM", () => receiver.close());
 * await receiver.finished;
 * ```
 */
export class Receiver {
  readonly options: ReceiverOptions;
  readonly limits: ReceiverLimits;
  #listener: Deno.Listener;
  #sessions = new Set<Session>();
  /** Who holds each host: its session, or a {@linkcode Receiver.sealHost} between sessions. */
  #hosts = new Map<string, HostHolder>();
  /** Per host, a counter that moves whenever the host's copy changes (see hostActivity). */
  #activity = new Map<string, number>();
  #nextConnectionId = 1;
  #closing: Promise<void> | undefined;
  #acceptLoop: Promise<void>;

  private constructor(options: ReceiverOptions, listener: Deno.Listener) {
    this.options = options;
    this.limits = {
      frameBytesMax: options.limits?.frameBytesMax ?? FRAME_BYTES_MAX,
      handshakeMsMax: options.limits?.handshakeMsMax ?? RECEIVE_HANDSHAKE_MS_MAX,
      idleMsMax: options.limits?.idleMsMax ?? RECEIVE_IDLE_MS_MAX,
      connectionsMax: options.limits?.connectionsMax ?? RECEIVE_CONNECTIONS_MAX,
    };
    this.#listener = listener;
    this.#acceptLoop = this.#accept();
  }

  /** Creates the store directory if needed and starts listening. */
  static async start(options: ReceiverOptions): Promise<Receiver> {
    await Deno.mkdir(options.storedir, { recursive: true });
    const hostname = options.hostname ?? "127.0.0.1";
    const listener = options.tls === undefined
      ? Deno.listen({ hostname, port: options.port })
      : Deno.listenTls({
        hostname,
        port: options.port,
        cert: options.tls.certPem,
        key: options.tls.keyPem,
      });
    return new Receiver(options, listener);
  }

  /** The address the receiver listens on. */
  get addr(): Deno.NetAddr {
    return this.#listener.addr as Deno.NetAddr;
  }

  /** Resolves once the receiver has closed. */
  get finished(): Promise<void> {
    return this.#acceptLoop.then(() => this.#closing);
  }

  /** Host ids with a session right now. */
  get activeHosts(): string[] {
    return [...this.#hosts.keys()];
  }

  /**
   * Stops accepting, lets every session finish the frame it is on, fsyncs and acks what it
   * appended, tells the sender the receiver is shutting down, and closes.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // Already closed.
    }
    await this.#acceptLoop;
    await Promise.all([...this.#sessions].map((session) => session.shutdown()));
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing === undefined) {
          this.emit({ level: "error", message: "Accept failed; not listening any more", error });
        }
        return;
      }
      const id = this.#nextConnectionId++;
      const remote = formatAddr(conn.remoteAddr);
      if (this.#sessions.size >= this.limits.connectionsMax) {
        this.emit({
          level: "warn",
          message:
            `Refused ${remote}: ${this.#sessions.size} connections open, the limit is ${this.limits.connectionsMax}`,
          connectionId: id,
          remote,
        });
        void refuseAndClose(conn, "limit", "The receiver is at its connection limit; retry later");
        continue;
      }
      const session = new Session(this, conn, id, remote);
      this.#sessions.add(session);
      session.run().finally(() => this.#sessions.delete(session));
    }
  }

  /** Reports an event to the caller. */
  emit(event: ReceiverEvent): void {
    try {
      this.options.onEvent?.(event);
    } catch {
      // A logger that throws must not take a session down.
    }
  }

  /** True while the receiver is shutting down. */
  get closing(): boolean {
    return this.#closing !== undefined;
  }

  /**
   * Seals the live segment of host `hostId`'s copy, so that every entry acked so far is in a
   * sealed segment (what an upload to object storage ships). With a session running, its writer
   * rotates while appends go on; between sessions the host is reserved for a moment (a session
   * connecting meanwhile waits) and its copy opened as writer to rotate. Returns who sealed:
   * `session`, `receiver`, or `none` (no copy, a state install running, or another process such
   * as a compaction holding the copy's lock: only sealed segments are there to upload).
   */
  async sealHost(hostId: string): Promise<"session" | "receiver" | "none"> {
    const holder = this.#hosts.get(hostId);
    if (holder instanceof Session) {
      return (await holder.seal()) === undefined ? "none" : "session";
    }
    if (holder !== undefined) return "none";
    let release!: () => void;
    const sealing: HostHolder = { done: new Promise<void>((resolve) => release = resolve) };
    this.#hosts.set(hostId, sealing);
    try {
      let store: HostStore;
      try {
        store = await HostStore.claim(this.options.storedir, hostId, {
          segmentBytesMax: this.options.segmentBytesMax,
        });
      } catch (error) {
        if (error instanceof BusyError) return "none";
        throw error;
      }
      try {
        return (await store.seal()) === undefined ? "none" : "receiver";
      } finally {
        await store.close();
      }
    } finally {
      this.#hosts.delete(hostId);
      release();
    }
  }

  /**
   * A number that changes whenever host `hostId`'s copy gets entries or a new state through this
   * receiver (0 before any): an uploader that saw the same number before needs no new round.
   */
  hostActivity(hostId: string): number {
    return this.#activity.get(hostId) ?? 0;
  }

  /** Counts a change of host `hostId`'s copy (see {@linkcode Receiver.hostActivity}). */
  noteActivity(hostId: string): void {
    this.#activity.set(hostId, this.hostActivity(hostId) + 1);
  }

  /**
   * Reserves `hostId` for `session`, waiting briefly for a previous session of the same host to
   * end (a restarted sender often connects before the receiver has seen the old connection drop).
   */
  async reserveHost(hostId: string, session: Session): Promise<boolean> {
    const previous = this.#hosts.get(hostId);
    if (previous !== undefined) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        previous.done,
        new Promise((resolve) => timer = setTimeout(resolve, BUSY_WAIT_MS)),
      ]);
      clearTimeout(timer);
    }
    if (this.#hosts.has(hostId)) return false;
    this.#hosts.set(hostId, session);
    return true;
  }

  /** Releases a reservation made by {@linkcode Receiver.reserveHost}. */
  releaseHost(hostId: string, session: Session): void {
    if (this.#hosts.get(hostId) === session) this.#hosts.delete(hostId);
  }
}

/** What holds a host in the receiver: a session, or a seal between sessions. */
interface HostHolder {
  readonly done: Promise<void>;
}

function formatAddr(addr: Deno.Addr): string {
  if (addr.transport === "tcp" || addr.transport === "udp") {
    return addr.hostname.includes(":")
      ? `[${addr.hostname}]:${addr.port}`
      : `${addr.hostname}:${addr.port}`;
  }
  return addr.transport;
}

/** Sends an ERROR frame (bounded in time) and closes. */
async function refuseAndClose(conn: Deno.Conn, code: ErrorCode, message: string): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([
      writeAll(conn, encodeJsonFrame(FRAME_TYPES.ERROR, { code, message })),
      new Promise((resolve) => timer = setTimeout(resolve, REFUSAL_WRITE_MS_MAX)),
    ]);
  } catch {
    // The peer is gone or never spoke TLS: the log line already says why it was refused.
  } finally {
    clearTimeout(timer);
    closeQuietly(conn);
  }
}

/** A refusal decided by the receiver: sent to the peer as an ERROR frame and logged. */
class Refusal extends Error {
  code: ErrorCode;
  hint?: string;
  constructor(code: ErrorCode, message: string, hint?: string) {
    super(message);
    this.code = code;
    this.hint = hint;
  }
}

/** One connection, from accept to close. */
class Session {
  readonly id: number;
  readonly remote: string;
  readonly done: Promise<void>;
  #receiver: Receiver;
  #conn: Deno.Conn;
  #reader: FrameReader;
  #hostId: string | undefined;
  #store: HostStore | undefined;
  #install: StateInstall | undefined;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #timeoutReason: string | undefined;
  #sendChain: Promise<void> = Promise.resolve();
  #ackLoop: Promise<void> | undefined;
  #ackAgain = false;
  #ackError: unknown;
  #reading = false;
  #shuttingDown = false;
  #finished = false;
  #resolveDone!: () => void;
  #entriesReceived = 0;
  #bytesReceived = 0;

  constructor(receiver: Receiver, conn: Deno.Conn, id: number, remote: string) {
    this.#receiver = receiver;
    this.#conn = conn;
    this.id = id;
    this.remote = remote;
    this.#reader = new FrameReader(conn, { frameBytesMax: CONTROL_BYTES_MAX });
    this.done = new Promise((resolve) => this.#resolveDone = resolve);
  }

  #emit(level: ReceiverEventLevel, message: string, error?: unknown): void {
    this.#receiver.emit({
      level,
      message,
      connectionId: this.id,
      remote: this.remote,
      hostId: this.#hostId,
      error,
    });
  }

  #who(): string {
    return this.#hostId === undefined ? this.remote : `host ${this.#hostId} (${this.remote})`;
  }

  async run(): Promise<void> {
    try {
      this.#arm(this.#receiver.limits.handshakeMsMax, "the handshake took longer than");
      const welcomed = await this.#handshake();
      this.#disarm();
      if (welcomed) await this.#serve();
    } catch (error) {
      await this.#fail(error);
    } finally {
      this.#disarm();
      await this.#settleAcks();
      try {
        await this.#store?.close();
      } catch (error) {
        this.#emit(
          "error",
          `Closing the store of ${this.#who()} failed: ${describe(error)}`,
          error,
        );
      }
      if (this.#hostId !== undefined) this.#receiver.releaseHost(this.#hostId, this);
      closeQuietly(this.#conn);
      this.#finished = true;
      this.#resolveDone();
    }
  }

  /** Seals the host's live segment (see {@linkcode HostStore.seal}). */
  seal(): Promise<number | undefined> {
    return this.#store?.seal() ?? Promise.resolve(undefined);
  }

  /** Stops after the frame in progress: fsync, final ack, an ERROR "shutdown", close. */
  async shutdown(): Promise<void> {
    this.#shuttingDown = true;
    if (this.#reading && !this.#finished) {
      await this.#settleAcks();
      await this.#sendBounded({
        code: "shutdown",
        message: "The receiver is shutting down; reconnect later",
      });
      this.#timeoutReason = "shutdown";
      closeQuietly(this.#conn);
    }
    await this.done;
  }

  #arm(ms: number, reason: string): void {
    this.#disarm();
    this.#timer = setTimeout(() => {
      // Tell the peer why before closing; the pending read then fails and #fail logs it.
      this.#timeoutReason = `${reason} ${ms} ms`;
      void this.#sendBounded({
        code: "limit",
        message: `Closed by the receiver: ${this.#timeoutReason}`,
      }).finally(() => closeQuietly(this.#conn));
    }, ms);
  }

  #disarm(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  async #readFrame(): Promise<Frame | undefined> {
    this.#reading = true;
    try {
      return await this.#reader.read();
    } finally {
      this.#reading = false;
    }
  }

  #send(value: unknown, type: number): Promise<void> {
    const frame = encodeJsonFrame(type as typeof FRAME_TYPES.ACK, value);
    this.#sendChain = this.#sendChain.then(() => writeAll(this.#conn, frame));
    return this.#sendChain;
  }

  async #sendBounded(error: { code: ErrorCode; message: string; hint?: string }): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await Promise.race([
        this.#send(error, FRAME_TYPES.ERROR),
        new Promise((resolve) => timer = setTimeout(resolve, REFUSAL_WRITE_MS_MAX)),
      ]);
    } catch {
      // The peer is gone; the log says why.
    } finally {
      clearTimeout(timer);
    }
  }

  async #fail(error: unknown): Promise<void> {
    if (this.#timeoutReason === "shutdown") return;
    if (this.#ackError !== undefined) error = this.#ackError;
    if (this.#timeoutReason !== undefined) {
      this.#emit("warn", `Closed the connection of ${this.#who()}: ${this.#timeoutReason}`);
      return;
    }
    const [code, level] = classify(error);
    const message = describe(error);
    this.#emit(level, `Refused ${this.#who()}: ${message}`, level === "error" ? error : undefined);
    await this.#sendBounded({ code, message, hint: (error as Refusal).hint });
  }

  async #handshake(): Promise<boolean> {
    const nonceS = makeNonce();
    const key = this.#receiver.options.key;
    await this.#send({
      protocol: PROTOCOL_NAME,
      version: PROTOCOL_VERSION,
      nonce: toHex(nonceS),
      authRequired: key !== undefined,
    }, FRAME_TYPES.SERVER_HELLO);
    const frame = await this.#readFrame();
    if (frame === undefined) {
      this.#emit("info", `${this.remote} closed the connection before its hello`);
      return false;
    }
    if (frame.type !== FRAME_TYPES.CLIENT_HELLO) {
      throw new ProtocolError(`Expected CLIENT_HELLO, got a ${frameTypeName(frame.type)} frame`);
    }
    const hello = parseClientHello(frame, decodeJsonBody(frame));
    checkVersions(hello);
    const nonceC = fromHex(hello.nonce, NONCE_BYTES);
    if (nonceC === undefined) throw new ProtocolError("CLIENT_HELLO nonce is not 32 bytes of hex");
    await this.#checkProof(hello, nonceS, nonceC);
    this.#checkHost(hello.hostId);
    await this.#claim(hello.hostId);
    const state = await this.#store!.state();
    checkIdentity(hello, state);
    const proof = key === undefined
      ? undefined
      : toHex(await serverProof(key, { server: nonceS, client: nonceC }, hello.hostId));
    await this.#send(
      { proof, store: state, idleMsMax: this.#receiver.limits.idleMsMax },
      FRAME_TYPES.WELCOME,
    );
    this.#reader.frameBytesMax = this.#receiver.limits.frameBytesMax;
    this.#emit(
      "info",
      `Host ${hello.hostId} connected from ${this.remote}: ${
        state.present
          ? `holds seq ${state.applyFromSeq}..${state.lastSeq}`
          : "no copy yet, expecting a base"
      }`,
    );
    return true;
  }

  async #checkProof(hello: ClientHello, nonceS: Uint8Array, nonceC: Uint8Array): Promise<void> {
    const key = this.#receiver.options.key;
    if (key === undefined) return;
    const proof = fromHex(hello.proof, 32);
    if (proof === undefined) {
      throw new Refusal(
        "auth",
        `Host ${JSON.stringify(hello.hostId)} sent no key proof, and this receiver requires a key`,
        "pass --key-file with the receiver's key to ship",
      );
    }
    const expected = await clientProof(key, { server: nonceS, client: nonceC }, hello.hostId);
    if (!constantTimeEqual(proof, expected)) {
      throw new Refusal(
        "auth",
        `Authentication failed for host ${
          JSON.stringify(hello.hostId)
        }: its key proof does not match this receiver's key`,
        "check that --key-file holds the same key on both sides",
      );
    }
  }

  #checkHost(hostId: string): void {
    const problem = hostIdProblem(hostId);
    if (problem !== undefined) {
      throw new Refusal("host", `Invalid host id ${JSON.stringify(hostId)}: ${problem}`);
    }
    const allow = this.#receiver.options.allowHosts;
    if (allow !== undefined && allow.length > 0 && !allow.includes(hostId)) {
      throw new Refusal(
        "host",
        `Host ${hostId} is not allowed on this receiver (allowed: ${allow.join(", ")})`,
      );
    }
  }

  async #claim(hostId: string): Promise<void> {
    if (!(await this.#receiver.reserveHost(hostId, this))) {
      throw new Refusal(
        "busy",
        `Host ${hostId} is already shipping to this receiver on another connection`,
      );
    }
    this.#hostId = hostId;
    // Another process may hold the copy's lock for a moment (an upload round sealing it, a
    // compaction's seal): wait a little before refusing.
    const deadlineMs = Date.now() + HOST_LOCK_WAIT_MS;
    for (;;) {
      try {
        this.#store = await HostStore.claim(this.#receiver.options.storedir, hostId, {
          segmentBytesMax: this.#receiver.options.segmentBytesMax,
        });
        return;
      } catch (error) {
        if (!(error instanceof BusyError)) throw error;
        if (Date.now() >= deadlineMs) throw new Refusal("busy", error.message);
      }
      await new Promise((resolve) => setTimeout(resolve, BUSY_RETRY_MS));
    }
  }

  async #serve(): Promise<void> {
    const idleMs = this.#receiver.limits.idleMsMax;
    for (;;) {
      if (this.#shuttingDown || this.#receiver.closing) {
        await this.#settleAcks();
        this.#timeoutReason = "shutdown";
        await this.#sendBounded({
          code: "shutdown",
          message: "The receiver is shutting down; reconnect later",
        });
        return;
      }
      this.#arm(idleMs, "no frame for");
      const frame = await this.#readFrame();
      this.#disarm();
      if (this.#ackError !== undefined) throw this.#ackError;
      if (frame === undefined) {
        this.#emit("info", `Host ${this.#hostId} disconnected`);
        return;
      }
      if (frame.type === FRAME_TYPES.BYE) {
        await this.#settleAcks();
        this.#emit(
          "info",
          `Host ${this.#hostId} finished: ${this.#entriesReceived} entries received, now at seq ${this.#lastSeq()}`,
        );
        return;
      }
      await this.#handle(frame);
    }
  }

  #lastSeq(): number {
    return (this.#store?.writer?.nextSeq ?? 1) - 1;
  }

  async #handle(frame: Frame): Promise<void> {
    const controlMax = frame.type === FRAME_TYPES.STATE_BEGIN
      ? STATE_BEGIN_BYTES_MAX
      : CONTROL_BYTES_MAX;
    const binary = frame.type === FRAME_TYPES.ENTRIES || frame.type === FRAME_TYPES.BASE_CHUNK ||
      frame.type === FRAME_TYPES.LEVEL_CHUNK;
    if (!binary && frame.body.length > controlMax) {
      throw new ProtocolError(
        `${
          frameTypeName(frame.type)
        } frame of ${frame.body.length} bytes is over the ${controlMax}-byte limit of control frames`,
      );
    }
    switch (frame.type) {
      case FRAME_TYPES.ENTRIES:
        await this.#appendEntries(frame);
        this.#receiver.noteActivity(this.#hostId!);
        this.#scheduleAck();
        return;
      case FRAME_TYPES.PING:
        await this.#settleAcks();
        await this.#send({ lastSeq: this.#lastSeq() }, FRAME_TYPES.ACK);
        return;
      case FRAME_TYPES.STATE_BEGIN:
        return await this.#stateBegin(frame);
      case FRAME_TYPES.BASE_CHUNK:
      case FRAME_TYPES.LEVEL_CHUNK:
        return this.#chunk(frame);
      case FRAME_TYPES.BASE_END:
      case FRAME_TYPES.LEVEL_BEGIN:
      case FRAME_TYPES.LEVEL_END:
      case FRAME_TYPES.STATE_END:
        return await this.#stateStep(frame);
      default:
        throw new ProtocolError(
          `Unexpected ${frameTypeName(frame.type)} frame after the handshake`,
        );
    }
  }

  async #stateBegin(frame: Frame): Promise<void> {
    if (this.#install !== undefined) throw new ProtocolError("STATE_BEGIN during a state transfer");
    const begin = parseStateBegin(frame, decodeJsonBody(frame));
    await this.#settleAcks();
    this.#install = await this.#store!.beginState(begin);
    this.#emit(
      "info",
      `Host ${this.#hostId}: receiving ${
        begin.reason === "new"
          ? "its base"
          : begin.reason === "compacted"
          ? "a compacted state (the source was compacted past this copy)"
          : "a replacement of its copy (--force)"
      }: base ${begin.baseIncluded ? "included" : "already here"}, ${begin.levels.length} level(s)`,
    );
  }

  #chunk(frame: Frame): void {
    const install = this.#requireInstall(frame);
    const chunk = decodeChunkBody(frame);
    const isBase = frame.type === FRAME_TYPES.BASE_CHUNK;
    const raw = decompressChunk(chunk, isBase ? "base chunk" : "level chunk");
    this.#bytesReceived += raw.length;
    if (isBase) install.baseChunk(chunk.offsetBytes, raw);
    else install.levelChunk(chunk.offsetBytes, raw);
  }

  async #stateStep(frame: Frame): Promise<void> {
    const install = this.#requireInstall(frame);
    const body = decodeJsonBody(frame);
    const text = (name: string) => {
      const value = body[name];
      if (typeof value !== "string" || value.length > 128) {
        throw new ProtocolError(`Bad ${frameTypeName(frame.type)} frame: ${name} missing`);
      }
      return value;
    };
    switch (frame.type) {
      case FRAME_TYPES.BASE_END:
        return await install.baseEnd(text("crc32c"));
      case FRAME_TYPES.LEVEL_BEGIN:
        return install.levelBegin(text("file"));
      case FRAME_TYPES.LEVEL_END:
        return await install.levelEnd(text("crc32c"));
    }
    const previous = await this.#store!.state();
    const manifest = await install.commit();
    this.#install = undefined;
    this.#receiver.noteActivity(this.#hostId!);
    const moved = previous.present && previous.horizonUs !== manifest.horizonUs
      ? `; horizon moved from ${formatTimeUtc(previous.horizonUs!)} to ${
        formatTimeUtc(manifest.horizonUs)
      }`
      : "";
    this.#emit(
      previous.present ? "warn" : "info",
      `Host ${this.#hostId}: installed ${
        install.begin.reason === "new" ? "its base" : `a ${install.begin.reason} state`
      }, entries resume at seq ${this.#lastSeq() + 1}${moved}`,
    );
    await this.#send({ lastSeq: this.#lastSeq() }, FRAME_TYPES.ACK);
  }

  #requireInstall(frame: Frame): StateInstall {
    if (this.#install === undefined) {
      throw new ProtocolError(`${frameTypeName(frame.type)} frame outside a state transfer`);
    }
    return this.#install;
  }

  /** Checks every entry of a frame, then appends them all (a bad frame appends nothing). */
  async #appendEntries(frame: Frame): Promise<void> {
    const writer = this.#store?.writer;
    if (writer === undefined || this.#install !== undefined) {
      throw new ProtocolError("ENTRIES frame before the host has a base (send its state first)");
    }
    const body = frame.body;
    const deviceBytes = writer.manifest.deviceBytes;
    const headers = parseEntries(frame, writer.nextSeq, writer.lastTimeUs, deviceBytes);
    // The body is the entries exactly as they sit on disk: written in one go, not entry by entry.
    let appended = 0;
    let position = 0;
    while (appended < headers.length) {
      while (!writer.canAppend) await writer.ready();
      const rest = headers.slice(appended);
      const count = writer.appendExistingRun(body.subarray(position), rest);
      for (let i = 0; i < count; i++) position += ENTRY_HEADER_BYTES + rest[i].payloadBytes;
      appended += count;
    }
    this.#entriesReceived += headers.length;
    this.#bytesReceived += body.length;
  }

  /** fsync, then ACK: one sync in flight at a time, covering every append made before it. */
  #scheduleAck(): void {
    if (this.#ackLoop !== undefined) {
      this.#ackAgain = true;
      return;
    }
    this.#ackLoop = (async () => {
      do {
        this.#ackAgain = false;
        const writer = this.#store?.writer;
        if (writer === undefined) return;
        const seq = writer.nextSeq - 1;
        await writer.sync();
        await this.#send({ lastSeq: seq }, FRAME_TYPES.ACK);
      } while (this.#ackAgain);
    })().catch((error) => {
      this.#ackError = error;
      closeQuietly(this.#conn);
    }).finally(() => this.#ackLoop = undefined);
  }

  async #settleAcks(): Promise<void> {
    while (this.#ackLoop !== undefined) await this.#ackLoop;
  }
}

function checkVersions(hello: ClientHello): void {
  if (hello.version !== PROTOCOL_VERSION) {
    throw new Refusal(
      "version",
      `Protocol version ${hello.version} is not supported (this receiver speaks version ${PROTOCOL_VERSION})`,
      "run the same sectorlog version on both sides",
    );
  }
  if (
    hello.entryFormatVersion !== ENTRY_FORMAT_VERSION ||
    hello.manifestFormatVersion !== MANIFEST_FORMAT_VERSION
  ) {
    throw new Refusal(
      "version",
      `Logdir format ${hello.manifestFormatVersion} with entry format ${hello.entryFormatVersion} is not supported (this receiver stores logdir format ${MANIFEST_FORMAT_VERSION}, entry format ${ENTRY_FORMAT_VERSION})`,
      "run the same sectorlog version on both sides",
    );
  }
}

function checkIdentity(hello: ClientHello, state: StoreState): void {
  if (!state.present || hello.force) return;
  if (state.logdirId !== hello.logdirId) {
    throw new Refusal(
      "identity",
      `Host ${hello.hostId} on this receiver holds logdir ${state.logdirId}, not ${hello.logdirId}: refusing to mix two logdirs under one host id`,
      "ship with another --host-id, or pass --force to replace the receiver's copy",
    );
  }
  if (state.deviceBytes !== hello.deviceBytes) {
    throw new Refusal(
      "identity",
      `Host ${hello.hostId} on this receiver holds a ${state.deviceBytes}-byte device, the sender's is ${hello.deviceBytes} bytes`,
      "pass --force to replace the receiver's copy",
    );
  }
}

/**
 * Decodes and checks the entries of an ENTRIES frame; throws on the first bad one. Payloads are
 * checked against the CRCs the frame reader computed from them, when it did (it reads each byte
 * once for both checks).
 */
function parseEntries(
  frame: Frame,
  nextSeq: number,
  lastTimeUs: number,
  deviceBytes: number,
): EntryHeader[] {
  const body = frame.body;
  const payloadCrc32c = frame.payloadCrc32c;
  const entries: EntryHeader[] = [];
  let position = 0;
  let expectedSeq = nextSeq;
  let previousUs = lastTimeUs;
  while (position < body.length) {
    const bad = (problem: string): never => {
      throw new IntegrityError(
        `Refused entry at byte ${position} of an ENTRIES frame (expected seq ${expectedSeq}): ${problem}`,
      );
    };
    const decoded = decodeEntryHeader(body, position);
    if (!decoded.ok) bad(decoded.problem);
    const header = (decoded as { header: EntryHeader }).header;
    const end = position + ENTRY_HEADER_BYTES + header.payloadBytes;
    if (end > body.length) bad("the entry extends past the frame");
    const payload = body.subarray(position + ENTRY_HEADER_BYTES, end);
    const payloadOk = payloadCrc32c === undefined
      ? payloadMatches(header, payload)
      : payload.length === header.payloadBytes &&
        payloadCrc32c[entries.length] === header.payloadCrc32c;
    if (!payloadOk) bad("bad payload checksum");
    if (header.seq !== expectedSeq) bad(`seq ${header.seq}`);
    if (header.timeUs < previousUs) bad(`time ${header.timeUs} µs is before ${previousUs} µs`);
    if (header.offsetBytes + header.lengthBytes > deviceBytes) {
      bad(
        `range ${header.offsetBytes}+${header.lengthBytes} is past the ${deviceBytes}-byte device`,
      );
    }
    normalizeReservedBytes(body, position, header);
    entries.push(header);
    expectedSeq++;
    previousUs = header.timeUs;
    position = end;
  }
  if (entries.length === 0) throw new ProtocolError("Empty ENTRIES frame");
  return entries;
}

/** Bytes of an entry header between its fields and its checksum: zero as encoded. */
const HEADER_RESERVED_START = 44;
const HEADER_RESERVED_END = 60;

/**
 * Rewrites the header at `position` as it would be encoded when its reserved bytes are not zero
 * (the checksum covers them, so they decoded cleanly): the stored bytes are then exactly those an
 * entry-by-entry append would have written.
 */
function normalizeReservedBytes(body: Uint8Array, position: number, header: EntryHeader): void {
  for (let i = position + HEADER_RESERVED_START; i < position + HEADER_RESERVED_END; i++) {
    if (body[i] !== 0) {
      encodeEntryHeader(header, body, position);
      return;
    }
  }
}

function classify(error: unknown): [ErrorCode, ReceiverEventLevel] {
  if (error instanceof Refusal) return [error.code, "warn"];
  if (error instanceof ProtocolError) return ["protocol", "warn"];
  if (error instanceof IntegrityError) return ["integrity", "warn"];
  if (error instanceof Deno.errors.BadResource || error instanceof Deno.errors.ConnectionReset) {
    return ["protocol", "warn"];
  }
  if (error instanceof Deno.errors.InvalidData) return ["protocol", "warn"];
  return ["internal", "error"];
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
