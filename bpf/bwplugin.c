// bwplugin's tc programs. cls_bpf runs them on the clsact hooks of a pod's
// host-side veth; one compiled copy serves every pod on the node.
//
//   bwp_count_from_pod   clsact ingress (packets the pod sends), first (prio
//                        0xb0d), direct action: count and classify, then pass
//                        the packet on to the next filter, ours or another tool's.
//   bwp_from_pod         clsact ingress, last (prio 0xfb0d), direct action:
//                        bpf_redirect() to the pod's ifb, whose root qdisc shapes
//                        them. Honoured by ifb from Linux 6.4. Last, so that other
//                        tools' filters see the pod's packets before they leave.
//   bwp_from_pod_mirred  the same redirect for older kernels: a plain classifier
//                        whose match runs the filter's act_mirred redirect instead.
//   bwp_to_pod           clsact egress (packets sent to the pod), first, direct
//                        action: count and classify, pass on; the veth's root
//                        qdisc shapes them.
//
//   bwp_tcx_from_pod     the counting programs again, for TCX links (Linux 6.6+),
//   bwp_tcx_to_pod       attached first on the veth's TCX hooks, before any other
//                        tool's TCX program and so before every clsact filter. The
//                        redirect stays the clsact's last filter: TCX programs run
//                        before all clsact filters, so a redirect from TCX would
//                        hide the pod's packets from every other tool's filter.
//
// Through the agent, ADD counts with the cls_bpf filters and answers; the agent
// then moves the counting to TCX links (each attach waits for an RCU grace
// period under the rtnl lock, ~13 ms here). The handover is exact: the TCX
// programs count only once the veth's claim in bwp_tcx carries BWP_TCX_COUNTS,
// and tag each packet they counted in skb->cb, so that the cls_bpf counter skips
// exactly those (a packet the TCX program saw before the flag, cls_bpf counts).
//
// TC_ACT_UNSPEC ("continue"; TCX_NEXT on a TCX hook) lets the filters and
// programs after ours run; TC_ACT_OK would end classification there and hide
// the pod's packets from every later filter.
//
// Each attachment's filters carry its node-unique attachment id (1..65535) as
// their classid; cls_bpf places it in skb->tc_classid (16 bits) before running
// us, and the pinned attach map turns it into that attachment's state.
// (Keying by ifindex would collide across network namespaces, and
// bpf_get_netns_cookie() cannot name the device's netns for socket-less skbs.)
//
// With shapedSubnets/unshapedSubnets, the peer address (destination from the
// pod, source to the pod) is looked up in a per-attachment LPM trie, and the
// HTB class is chosen through skb->priority = b0d0:1 (shaped) or b0d0:2
// (unshaped), which HTB honours before any filter.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#define ETH_HLEN 14
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define BWP_HTONS(x) ((__u16)__builtin_bswap16(x))
#else
#define BWP_HTONS(x) ((__u16)(x))
#endif

// bwp_val.flags, written by the loader (bwplugin/bpf.py)
#define F_EGRESS_SHAPED   1  // the pod's traffic out has a rate
#define F_INGRESS_SHAPED  2  // traffic to the pod has a rate
#define F_SUBNETS         4  // classify by peer address (HTB with two classes)
#define F_LISTED_UNSHAPED 8  // listed prefixes are unshaped (unshapedSubnets), else shaped
// Counting starts when what the direction is counted for is in place (the root
// qdisc to the pod, the redirect from it), so that the counters and the queue
// see the same packets: ADD attaches the programs first and sets these last.
#define F_COUNT_TO_POD    16
#define F_COUNT_FROM_POD  32

#define HTB_SHAPED   0xB0D00001
#define HTB_UNSHAPED 0xB0D00002

struct bwp_count {
    __u64 packets;  // offered: counted before the qdisc queues or drops
    __u64 bytes;
};

struct bwp_val {
    __u32 ifb_ifindex;   // 0: pod egress is not redirected
    __u32 host_ifindex;  // the veth the filters sit on
    __u32 flags;
    __u32 reserved;
    __u64 owner;         // hash of (network, container ID, ifname): DEL/GC find entries by it
    __u64 network;       // hash of the network name: GC only touches its own network
    struct bwp_count from_pod_shaped, from_pod_unshaped, to_pod_shaped, to_pod_unshaped;
    char ifname[16];     // for tooling (bwplugin stats); never read here
    char container_id[128];
};

struct bwp_lpm_key {
    __u32 prefixlen;  // 32 (id, family, pad) + the CIDR's prefix length
    __u16 id;
    __u8 family;      // 4 or 6
    __u8 pad;
    __u8 addr[16];
};

// Whose attachment this is: the Kubernetes pod from CNI_ARGS, for bwplugin
// stats and metrics. Written and read by the loader only; never on the data path.
struct bwp_pod {
    char ns[64];     // K8S_POD_NAMESPACE (at most 63 characters)
    char name[256];  // K8S_POD_NAME (at most 253)
    char uid[64];    // K8S_POD_UID
};

// What shapes an attachment now: the rates ADD was given, the ones in force
// (equal, unless `bwplugin set` or the annotation watch changed them live), and
// the ADD-time queue policy a live change needs to size the new queues. CHECK
// compares the kernel with the rates in force. Loader only; never on the data path.
struct bwp_shaping {
    __u64 add_rate[2], add_burst[2];  // [0] ingress (to the pod), [1] egress; bits/s, bits; 0: unshaped
    __u64 rate[2], burst[2];          // in force
    __u64 subnets_digest;             // of the prefix list in force (CHECK detects tampering)
    __u32 latency_us, max_burst_us;   // latencyMs, maxBurstMs
    __u32 mtu, gso_max;               // of the veth pair at ADD
    __u32 flags;                      // S_* in bwplugin/datapath/bpf.py
    __u32 changes;                    // live changes applied
};

// BWP_*_PIN and BWP_MAX_* come from the loader, which versions the pin paths by
// this layout so that upgrades keep their counters.
BPF_TABLE_PINNED("hash", __u32, struct bwp_val, bwp_attach, BWP_MAX_ATTACH, BWP_MAP_PIN, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct bwp_pod, bwp_pods, BWP_MAX_ATTACH, BWP_POD_PIN, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct bwp_shaping, bwp_shaping, BWP_MAX_ATTACH, BWP_SHAPING_PIN,
                 BPF_F_NO_PREALLOC);
// TCX links carry no classid: the veth's ifindex finds the attachment id, and
// BWP_TCX_COUNTS once the TCX programs count (see the handover above). (One
// pin directory serves one network namespace's veths; ADD falls back to cls_bpf
// on an ifindex that another live attachment already holds.)
BPF_TABLE_PINNED("hash", __u32, __u32, bwp_tcx, BWP_MAX_ATTACH, BWP_TCX_PIN, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct bwp_lpm_key, __u8, bwp_subnets, BWP_MAX_SUBNETS, BWP_LPM_PIN,
                 BPF_F_NO_PREALLOC);

// Is the peer address in this attachment's list?
static __always_inline int bwp_listed(struct __sk_buff *skb, __u32 id, int peer_is_dst)
{
    struct bwp_lpm_key key = {};
    key.id = id;
    if (skb->protocol == BWP_HTONS(0x0800)) {
        key.family = 4;
        key.prefixlen = 32 + 32;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + (peer_is_dst ? 16 : 12), key.addr, 4) < 0)
            return 0;
    } else if (skb->protocol == BWP_HTONS(0x86DD)) {
        key.family = 6;
        key.prefixlen = 32 + 128;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + (peer_is_dst ? 24 : 8), key.addr, 16) < 0)
            return 0;
    } else {
        return 0;  // ARP and friends take the default class
    }
    return bwp_subnets.lookup(&key) != 0;
}

// A GSO packet as the qdiscs count it (qdisc_pkt_len_init): its segments, and
// its length plus the headers each further segment repeats. Counted the same
// way, offered = sent + dropped + queued holds for TCP, not only for UDP.
static __always_inline void bwp_wire_size(struct __sk_buff *skb, __u64 *packets, __u64 *bytes)
{
    __u32 len = skb->len, gso = skb->gso_size, segs = skb->gso_segs, hdr = ETH_HLEN;
    __u8 byte = 0, proto = 0;
    *packets = 1;
    *bytes = len;
    if (!gso)
        return;  // not a GSO packet
    if (skb->protocol == BWP_HTONS(0x0800)) {
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &byte, 1) < 0 || bpf_skb_load_bytes(skb, ETH_HLEN + 9, &proto, 1) < 0)
            return;
        hdr += (byte & 0xf) * 4;  // IPv4 header length (ihl)
    } else if (skb->protocol == BWP_HTONS(0x86DD)) {
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &proto, 1) < 0)
            return;
        hdr += 40;  // GSO packets carry no IPv6 extension headers here
    } else {
        return;
    }
    if (proto == 6) {  // TCP: data offset, in 32-bit words, in the high nibble of byte 12
        if (bpf_skb_load_bytes(skb, hdr + 12, &byte, 1) < 0)
            return;
        hdr += (byte >> 4) * 4;
    } else if (proto == 17) {
        hdr += 8;  // UDP
    } else {
        return;
    }
    if (segs == 0 && len > hdr)
        segs = (len - hdr + gso - 1) / gso;
    if (segs > 1) {
        *packets = segs;
        *bytes = len + (__u64)(segs - 1) * hdr;
    }
}

// When this direction is split by subnets, picks the packet's HTB class.
// Returns 1 if the packet is shaped.
static __always_inline int bwp_classify(struct __sk_buff *skb, struct bwp_val *val, __u32 id, int from_pod)
{
    __u32 flags = val->flags;
    int shaped = (flags & (from_pod ? F_EGRESS_SHAPED : F_INGRESS_SHAPED)) != 0;
    if (shaped && (flags & F_SUBNETS)) {
        int listed = bwp_listed(skb, id, from_pod);
        shaped = (flags & F_LISTED_UNSHAPED) ? !listed : listed;
        skb->priority = shaped ? HTB_SHAPED : HTB_UNSHAPED;
    }
    return shaped;
}

// Classifies and counts the packet.
static __always_inline void bwp_account(struct __sk_buff *skb, struct bwp_val *val, __u32 id, int from_pod)
{
    int shaped = bwp_classify(skb, val, id, from_pod);
    if (!(val->flags & (from_pod ? F_COUNT_FROM_POD : F_COUNT_TO_POD)))
        return;  // ADD is not done with this direction yet
    struct bwp_count *c;
    if (from_pod)
        c = shaped ? &val->from_pod_shaped : &val->from_pod_unshaped;
    else
        c = shaped ? &val->to_pod_shaped : &val->to_pod_unshaped;
    __u64 packets, bytes;
    bwp_wire_size(skb, &packets, &bytes);
    __sync_fetch_and_add(&c->packets, packets);
    __sync_fetch_and_add(&c->bytes, bytes);
}

// bwp_tcx values: the attachment id, and whether its TCX programs count yet
#define BWP_TCX_ID     0xffff
#define BWP_TCX_COUNTS 0x10000
// skb->cb[BWP_CB] after a TCX program counted the packet for (id, direction);
// TCX programs run before every clsact filter and write it on every packet of
// their veth, and nothing between them and our cls_bpf counter is ours to trust
// with it, so the tag carries the id and direction as well as a constant.
#define BWP_CB 4
#define BWP_TAG(id, from_pod) (0xb0d00000u ^ ((id) << 1) ^ (from_pod))

static __always_inline int bwp_tcx_counts(__u32 ifindex, __u32 id)
{
    __u32 *claim = bwp_tcx.lookup(&ifindex);
    return claim && (*claim & BWP_TCX_ID) == id && (*claim & BWP_TCX_COUNTS);
}

// cls_bpf counting: the filter's classid is the attachment id
static __always_inline int bwp_cls_count(struct __sk_buff *skb, int from_pod)
{
    __u32 id = skb->tc_classid & 0xffff;
    struct bwp_val *val = bwp_attach.lookup(&id);
    if (!val)
        return TC_ACT_UNSPEC;
    // counted by the TCX program already (during the agent's handover): the tag
    // alone could be another tool's leftover, so the flag must say so too
    if (skb->cb[BWP_CB] == BWP_TAG(id, from_pod) && bwp_tcx_counts(skb->ifindex, id))
        return TC_ACT_UNSPEC;
    bwp_account(skb, val, id, from_pod);
    return TC_ACT_UNSPEC;
}

int bwp_count_from_pod(struct __sk_buff *skb) { return bwp_cls_count(skb, 1); }

int bwp_from_pod(struct __sk_buff *skb)
{
    __u32 id = skb->tc_classid & 0xffff;
    struct bwp_val *val = bwp_attach.lookup(&id);
    // no entry (torn down mid-flight) or egress unshaped: pass on, never black-hole a pod
    if (!val || !val->ifb_ifindex)
        return TC_ACT_UNSPEC;
    return bpf_redirect(val->ifb_ifindex, 0);
}

int bwp_from_pod_mirred(struct __sk_buff *skb)
{
    __u32 id = skb->tc_classid & 0xffff;
    struct bwp_val *val = bwp_attach.lookup(&id);
    if (!val)
        return 0;  // classifier "no match": the mirred action does not run
    return val->ifb_ifindex ? -1 : 0;  // -1: match, run the filter's actions
}

int bwp_to_pod(struct __sk_buff *skb) { return bwp_cls_count(skb, 0); }

// The attachment of the veth this TCX program runs on, if its entry says so.
static __always_inline struct bwp_val *bwp_tcx_val(struct __sk_buff *skb, __u32 *id, int *counts)
{
    __u32 ifindex = skb->ifindex;
    __u32 *claim = bwp_tcx.lookup(&ifindex);
    if (!claim)
        return 0;
    *id = *claim & BWP_TCX_ID;
    *counts = (*claim & BWP_TCX_COUNTS) != 0;
    struct bwp_val *val = bwp_attach.lookup(id);
    return val && val->host_ifindex == ifindex ? val : 0;
}

static __always_inline int bwp_tcx_count(struct __sk_buff *skb, int from_pod)
{
    __u32 id = 0;
    int counts = 0;
    struct bwp_val *val = bwp_tcx_val(skb, &id, &counts);
    if (!val)
        return TC_ACT_UNSPEC;  // TCX_NEXT
    if (counts) {
        bwp_account(skb, val, id, from_pod);
        skb->cb[BWP_CB] = BWP_TAG(id, from_pod);
    } else {
        bwp_classify(skb, val, id, from_pod);  // cls_bpf still counts
        skb->cb[BWP_CB] = 0;
    }
    return TC_ACT_UNSPEC;
}

int bwp_tcx_from_pod(struct __sk_buff *skb) { return bwp_tcx_count(skb, 1); }
int bwp_tcx_to_pod(struct __sk_buff *skb) { return bwp_tcx_count(skb, 0); }
