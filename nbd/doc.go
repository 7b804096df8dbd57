// Package nbd is blockd's NBD server: it exports graph nodes over the
// Network Block Device protocol (doc/proto.md of NetworkBlockDevice/nbd,
// with the extended-headers extension), behaving like qemu-storage-daemon's
// server where the protocol leaves a choice.
//
// # API
//
//	s := nbd.NewServer(nbd.Options{TLSConfig: cfg, MaxConnections: 100})
//	s.AddExport(&nbd.Export{Name: "disk", Node: node, ReadOnly: false})
//	go s.Serve(listener)                 // any number of listeners
//	done, err := s.RemoveExport("disk", hard)
//	s.Clients("disk")                    // connections in transmission
//	s.Close()                            // listeners, clients, wait
//
// ServeConn serves one connected net.Conn (nbd/attach uses it to hand one
// end of a socket pair to the kernel). Errors from RemoveExport wrap
// graph.ErrNotFound or graph.ErrInUse; AddExport reports a duplicate as
// "NBD server already has export named 'disk'". RemoveExport unlists the
// export at once; in hard mode done is closed when the disconnected
// clients' in-flight requests have finished (QMP's BLOCK_EXPORT_DELETED).
// The server never closes nodes.
//
// # Handshake
//
// Fixed newstyle with NBD_FLAG_NO_ZEROES. Clients without
// NBD_FLAG_C_FIXED_NEWSTYLE may only send NBD_OPT_EXPORT_NAME, as QEMU
// allows; anything else, unknown client flags, a bad option magic, an
// option longer than 32 MiB, or NBD_OPT_EXPORT_NAME for an unknown export
// closes the connection. Oldstyle clients see the newstyle greeting and
// hang up. Options: EXPORT_NAME, ABORT, LIST (name and description), INFO
// and GO (NBD_INFO_EXPORT, NAME when asked, DESCRIPTION when set,
// BLOCK_SIZE always), STARTTLS, STRUCTURED_REPLY, EXTENDED_HEADERS,
// LIST_META_CONTEXT and SET_META_CONTEXT with the single context
// base:allocation (id 0). Others get NBD_REP_ERR_UNSUP. Malformed payloads
// get NBD_REP_ERR_INVALID; meta-context options over 64 KiB are skipped
// and get NBD_REP_ERR_TOO_BIG; the connection stays usable.
//
// Block sizes follow QEMU: the real minimum (graph.Limiter's Align) is
// advertised to NBD_OPT_INFO and to NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE
// request, which also makes the server refuse unaligned requests with
// EINVAL; other clients are told 1 and their requests go to the node as
// they are (the graph's validation layer widens them). NBD_OPT_INFO without
// the request on an export needing alignment ends with
// NBD_REP_ERR_BLOCK_SIZE_REQD. The preferred size is max(4096, minimum),
// the maximum min(MaxTransfer, 32 MiB); requests larger than MaxTransfer
// are split by the graph's validation layer, not here. The export size is Node.Size() at
// NBD_OPT_GO time.
//
// With Options.TLSConfig the server runs in FORCEDTLS mode as QEMU with
// tls-creds: before STARTTLS every option but STARTTLS and ABORT gets
// NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME closes the connection; a
// failed TLS handshake closes it too. Nothing negotiated before STARTTLS
// is kept. HandshakeTimeout (10 s by default) bounds the whole handshake,
// TLS included.
//
// # Transmission
//
// Flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_CACHE, CAN_MULTI_CONN
// (unless MaxConnections is 1), READ_ONLY or SEND_TRIM +
// SEND_WRITE_ZEROES + SEND_FAST_ZERO, and SEND_DF once structured replies
// or extended headers are negotiated. Commands READ, WRITE, DISC, FLUSH,
// TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS (REQ_ONE) and
// CACHE, with FUA.
//
//   - READ: structured reads of 64 KiB or more on nodes with
//     graph.BlockStatuser become data and NBD_REPLY_TYPE_OFFSET_HOLE chunks
//     (zero extents are not read); with DF one data chunk; smaller reads
//     one chunk, a hole chunk when the data read is all zeroes (no payload
//     to send, as QEMU's block-status-driven replies). FUA flushes first
//     (as QEMU).
//   - WRITE_ZEROES uses graph.Zeroer (MayUnmap unless NO_HOLE, NoFallback
//     for FAST_ZERO) and otherwise writes zero buffers; FAST_ZERO without a
//     Zeroer fails with ENOTSUP without touching data.
//   - TRIM uses graph.Discarder when present (a hint otherwise); FUA
//     flushes after it. CACHE uses graph.Cacher when present.
//   - BLOCK_STATUS answers base:allocation from graph.BlockStatuser
//     (ExtentHole → NBD_STATE_HOLE, ExtentZero → NBD_STATE_ZERO), merging
//     equal neighbours, at most 131072 extents; nodes without it report the
//     range as data.
//
// Errors are replied with NBD errnos (graph.Errno mapped as QEMU's
// system_errno_to_nbd_errno): out of range → EINVAL, or ENOSPC for WRITE
// and WRITE_ZEROES; writes to read-only exports → EPERM; unknown commands
// and flags, DF without structured replies, READ/CACHE over 32 MiB,
// BLOCK_STATUS without a negotiated context or with length 0 → EINVAL; a
// cancelled request → ESHUTDOWN. With structured replies errors come as
// NBD_REPLY_TYPE_ERROR chunks with a message, and a READ is never answered
// with a simple reply. A payload on a non-WRITE extended request is read
// and discarded before EINVAL. A WRITE payload over 32 MiB cannot be
// buffered: the server answers EINVAL and disconnects. A request with a
// bad magic gets EINVAL ("invalid magic (got 0x...)") for the cookie in
// its header, as from qemu-storage-daemon 7.2, and then the connection is
// closed: the stream cannot be trusted to be in sync.
//
// Each connection reads requests on one goroutine, runs them on
// MaxInFlight (16) workers and writes replies on one goroutine through a
// buffered writer that is flushed when no reply is pending. Small READs
// and WRITEs (up to 64 KiB, without FUA) and BLOCK_STATUS are served by
// the reading goroutine itself while such requests have recently taken
// under 20 µs (a cached or in-memory node): the hand-offs would cost more
// than the work. Their replies are flushed when no further request is
// waiting on the socket, so a burst is answered with one write. A request
// that runs for 2 ms on the reader has another goroutine take over
// reading, and the connection then serves such requests on its workers
// until they are fast again, so one slow request never holds up the ones
// behind it. A reply is sent only after its I/O completed, so no header
// precedes data that could still fail, and a WRITE is on the node before
// it is acknowledged (FLUSH then covers all acknowledged writes through
// Node.Flush). Buffers come from internal/bufpool: the request loop does
// not allocate, and the large buffers go back to the system about a
// second after a burst.
//
// The memory of request buffers (READ data, WRITE payloads, at the pool's
// size class) is bounded per connection (MaxConnRequestMemory, 128 MiB)
// and for the server (MaxRequestMemory, 512 MiB). A request whose bytes
// are not free waits for them, in arrival order, before its buffer is
// taken (a WRITE before its payload is read), and its connection reads
// nothing more meanwhile: the client is held back by TCP. The reader
// sends the replies it served itself before it waits. Clients must read
// replies while they send requests (QEMU, libnbd and the kernel do); one
// that only reads after sending can stall on large WRITEs, as with QEMU
// once 16 requests are in flight.
// NBD_CMD_DISC lets in-flight requests finish and their replies go out; a
// hang-up, a protocol violation, RemoveExport(hard) or Close cancels the
// connection's context, and the connection is only released once its
// in-flight requests have returned.
//
// When a client arrives with MaxConnections connections open, the oldest
// one that has not finished its handshake (entered transmission) is
// closed to make room, so idle sockets cannot lock clients out for the
// handshake timeout; if all are in transmission, the new connection is
// closed right after accept.
package nbd
