"""A link delay for the fabric test bed on kernels without netem: packets held in a netfilter queue.

The test bed sends every packet arriving at one end of its veth to a
netfilter queue (an iptables NFQUEUE rule in that namespace's mangle
PREROUTING chain, -i that end, with --queue-bypass so that packets pass
when no process listens);
this process, running in the same namespace, takes each packet's id from the
queue (metadata only: the payload stays in the kernel), and once the packet
has waited `seconds` accepts it with a batch verdict.  Packets leave in
order: every packet is delayed by the same time, so the verdict for the
newest due packet releases all older ones in one message.  The queue is
sized for the delay and fails open (a packet that finds it full passes at
once rather than being dropped).

The process wakes for every packet, which adds 0.1-0.2 ms of its own to each
packet's delay and caps a 10 Gbit/s veth at 3-5 Gbit/s here (2 vCPUs):
delays of a millisecond and more are what it emulates well; netem, where
the kernel has it, is the tool for finer ones.

It speaks the nfnetlink_queue protocol (linux/netfilter/nfnetlink_queue.h)
over a raw netlink socket; the kernel needs CONFIG_NETFILTER_NETLINK_QUEUE
and the NFQUEUE target, which kernels without netem often still have.

    python -m embtier_tools.fabric_delay --queue N --seconds S

prints "ready" once bound, then runs until killed.
"""

from __future__ import annotations

import argparse
import collections
import errno
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1, 4
NF_ACCEPT = 1
HEADER = struct.Struct("=IHHII")   # struct nlmsghdr
RECV_BYTES = 1 << 20
MIN_QUEUE_PACKETS = 4096


class QueueError(RuntimeError):
    """The kernel refused a netfilter queue request."""


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _attrs(body: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, body[offset + 4:offset + length]
        offset += (length + 3) & ~3


class NetfilterQueue:
    """One bound netfilter queue: packet ids in, batch verdicts out."""

    def __init__(self, number: int, max_packets: int):
        self.number = number
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack(">BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)),
                     _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", max_packets)),
                     _attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)),
                     _attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)))

    def _send(self, kind: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> int:
        self._seq += 1
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", self.number) + attrs
        self.sock.send(HEADER.pack(HEADER.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, self._seq, 0)
                       + body)
        return self._seq

    def _config(self, *attrs: bytes) -> None:
        """Sends a configuration message and waits for the kernel's acknowledgement."""
        seq = self._send(NFQNL_MSG_CONFIG, b"".join(attrs), NLM_F_REQUEST | NLM_F_ACK)
        while True:
            data = self.sock.recv(RECV_BYTES)
            offset = 0
            while offset + HEADER.size <= len(data):
                length, kind, _, got_seq, _ = HEADER.unpack_from(data, offset)
                if kind == NLMSG_ERROR and got_seq == seq:
                    (code,) = struct.unpack_from("=i", data, offset + HEADER.size)
                    if code:
                        raise QueueError(f"netfilter queue {self.number}: configuration refused: "
                                         f"{errno.errorcode.get(-code, -code)}")
                    return
                offset += max(HEADER.size, (length + 3) & ~3)

    def packet_ids(self) -> list[int]:
        """The ids of the packets queued since the last call (waits for at least one message)."""
        data = self.sock.recv(RECV_BYTES)
        ids = []
        offset = 0
        while offset + HEADER.size <= len(data):
            length, kind, _, _, _ = HEADER.unpack_from(data, offset)
            if length < HEADER.size:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                for attr, payload in _attrs(data[offset + HEADER.size + 4:offset + length]):
                    if attr == NFQA_PACKET_HDR:
                        ids.append(struct.unpack_from(">I", payload)[0])
            offset += (length + 3) & ~3
        return ids

    def accept_through(self, packet_id: int) -> None:
        """Accepts every queued packet whose id is <= packet_id."""
        self._send(NFQNL_MSG_VERDICT_BATCH, _attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet_id)))


def run(number: int, seconds: float, max_packets: int = MIN_QUEUE_PACKETS) -> None:
    """Delays every packet of queue number by seconds, until killed."""
    queue = NetfilterQueue(number, max_packets)
    print("ready", flush=True)
    waiting: collections.deque[tuple[float, int]] = collections.deque()
    while True:
        timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else None
        readable, _, _ = select.select([queue.sock], [], [], timeout)
        if readable:
            due = time.monotonic() + seconds
            waiting.extend((due, packet_id) for packet_id in queue.packet_ids())
        now = time.monotonic()
        last = None
        while waiting and waiting[0][0] <= now:
            last = waiting.popleft()[1]
        if last is not None:
            queue.accept_through(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embtier_tools.fabric_delay", description=__doc__.split("\n")[0])
    parser.add_argument("--queue", type=int, required=True, help="netfilter queue number")
    parser.add_argument("--seconds", type=float, required=True, help="delay of every packet")
    parser.add_argument("--max-packets", type=int, default=MIN_QUEUE_PACKETS, help="queue length")
    args = parser.parse_args(argv)
    try:
        run(args.queue, args.seconds, args.max_packets)
    except (QueueError, OSError) as e:
        print(f"embtier_tools.fabric_delay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
