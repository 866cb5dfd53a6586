// bwplugin: the pod-egress redirect, run by cls_bpf (direct action) on the
// clsact *ingress* hook of a pod's host-side veth. Packets the pod sends arrive
// there; we count them and bpf_redirect() them to the pod's ifb, whose root TBF
// shapes them. bpf_redirect into an ifb from tc ingress needs Linux >= 6.4.
//
// One program serves every pod on the node. Each attachment's filter is created
// with its own classid, a node-unique attachment id (1..65535) that cls_bpf places
// in skb->tc_classid (16 bits wide) before running us; the pinned map turns that
// id into the ifb.
// (Keying by host ifindex would collide across network namespaces, and
// bpf_get_netns_cookie() cannot name the device's netns for socket-less skbs.)
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

struct bwp_val {
    __u32 ifb_ifindex;   // where this attachment's pod-egress goes to be shaped
    __u32 host_ifindex;  // the veth the filter sits on (for tooling; not used here)
    __u64 packets;       // counted before the ifb's qdisc drops any
    __u64 bytes;
};

// BWP_MAP_PIN and BWP_MAX_ATTACH come from the loader (bwplugin/bpf.py), which
// versions the pin path by this layout so that upgrades keep their counters.
BPF_TABLE_PINNED("hash", __u32, struct bwp_val, bwp_attach, BWP_MAX_ATTACH, BWP_MAP_PIN);

int bwp_egress(struct __sk_buff *skb)
{
    __u32 id = skb->tc_classid & 0xffff;
    struct bwp_val *val = bwp_attach.lookup(&id);
    if (!val)
        return TC_ACT_OK;  // no entry (torn down mid-flight): pass, never black-hole a pod

    __sync_fetch_and_add(&val->packets, 1);
    __sync_fetch_and_add(&val->bytes, skb->len);
    return bpf_redirect(val->ifb_ifindex, 0);
}
