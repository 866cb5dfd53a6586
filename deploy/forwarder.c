/* bwplugin-forward: the CNI executable for nodes without Python.
 *
 * The DaemonSet's init container installs this static binary as
 * /opt/cni/bin/bwplugin. It hands the runtime's request to the node agent over
 * its unix socket and prints the agent's answer: the agent does all the work,
 * so this needs no interpreter and no library, and the agent is required. It
 * speaks the same frames as bwplugin/node/client.py:
 *
 *   request: "<env bytes> <stdin bytes>\n" env (KEY=VALUE\0 ..., CNI_* only) stdin
 *   reply:   "<exit code> <stdout bytes> <stderr bytes>\n" stdout stderr
 *
 * While the agent restarts (a crash, a rolling update) ADD, DEL, CHECK and GC wait
 * for its socket, up to WAIT_MS: a pod is then set up late rather than failed, and a
 * DEL is not lost (a failed DEL of a failed ADD would leave the pod's IP and veth
 * behind). With no agent after that, it answers with a CNI error: 11 ("try again
 * later"), which runtimes retry; STATUS and VERSION do not wait, and STATUS answers
 * 50 ("not available"), so the runtime's view agrees with the agent's health.
 *
 * Built with: gcc -static -Os -s -o bwplugin-forward forwarder.c
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/bwplugin/agent.sock"
#define MAX_REQUEST (1 << 20) /* the agent refuses larger requests anyway */
#define MAX_REPLY (16 << 20)
#define WAIT_MS 30000 /* a restarting agent: the kubelet's first restarts come within seconds */
#define RETRY_MS 100

extern char **environ;

struct buf {
    char *data;
    size_t len, cap;
};

static void put(struct buf *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) {
            perror("bwplugin-forward: realloc");
            exit(1);
        }
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static int read_all(int fd, struct buf *b, size_t limit)
{
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        if (b->len + (size_t)n > limit) {
            errno = EMSGSIZE;
            return -1;
        }
        put(b, chunk, (size_t)n);
    }
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The request's cniVersion, for the error's own; "1.1.0" if none is simple to find. */
static void cni_version(const struct buf *in, char *out, size_t size)
{
    const char *key = "\"cniVersion\"";
    char *text = malloc(in->len + 1);
    snprintf(out, size, "1.1.0");
    if (!text)
        return;
    memcpy(text, in->data ? in->data : "", in->len);
    text[in->len] = 0;
    char *p = strstr(text, key);
    if (p) {
        p += strlen(key);
        p += strspn(p, " \t\r\n");
        if (*p == ':') {
            p++;
            p += strspn(p, " \t\r\n");
            size_t n = *p == '"' ? strspn(p + 1, "0123456789.") : 0;
            if (n > 0 && n < size && p[1 + n] == '"')
                snprintf(out, size, "%.*s", (int)n, p + 1);
        }
    }
    free(text);
}

/* Writes s as JSON string content: the socket path comes from the environment. */
static void json_text(const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
}

static int cni_error(const struct buf *in, const char *path, const char *why)
{
    const char *cmd = getenv("CNI_COMMAND");
    int code = cmd && strcmp(cmd, "STATUS") == 0 ? 50 : 11;
    char version[32];
    cni_version(in, version, sizeof version);
    printf("{\"cniVersion\": \"%s\", \"code\": %d, \"msg\": \"bwplugin agent not reachable at ", version, code);
    json_text(path);
    printf(": ");
    json_text(why);
    printf("\", \"details\": \"this node runs bwplugin-forward, which needs the node agent "
           "(the bwplugin-agent DaemonSet)\"}\n");
    return 1;
}

int main(int argc, char **argv)
{
    if (argc > 1) { /* runtimes pass no arguments */
        fprintf(stderr, "bwplugin-forward: this is the CNI executable for nodes without Python; run `bwplugin %s` "
                        "in the agent's container (kubectl exec) or as /opt/bwplugin/lib/bwplugin-cli\n",
                argv[1]);
        return 2;
    }
    const char *path = getenv("BWPLUGIN_AGENT_SOCKET");
    if (!path || !*path)
        path = DEFAULT_SOCKET;

    struct buf in = {0}, env = {0}, req = {0}, reply = {0};
    if (read_all(0, &in, MAX_REQUEST) < 0)
        return cni_error(&in, path, "reading the request failed");
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "CNI_", 4) == 0) /* the CNI protocol only: the agent's settings are its own */
            put(&env, *e, strlen(*e) + 1);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return cni_error(&in, path, "the socket path is too long");
    strcpy(addr.sun_path, path);
    const char *cmd = getenv("CNI_COMMAND");
    int wait = !(cmd && (strcmp(cmd, "STATUS") == 0 || strcmp(cmd, "VERSION") == 0));
    int fd = -1;
    for (int waited = 0;; waited += RETRY_MS) {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return cni_error(&in, path, strerror(errno));
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
            break;
        int err = errno;
        close(fd);
        /* no socket yet, or nobody accepting on it: the agent is (re)starting */
        if (!wait || waited >= WAIT_MS || (err != ENOENT && err != ECONNREFUSED))
            return cni_error(&in, path, strerror(err));
        struct timespec ts = {0, RETRY_MS * 1000000L};
        nanosleep(&ts, NULL);
    }

    char head[64];
    int n = snprintf(head, sizeof head, "%zu %zu\n", env.len, in.len);
    put(&req, head, (size_t)n);
    if (env.len)
        put(&req, env.data, env.len);
    if (in.len)
        put(&req, in.data, in.len);
    if (write_all(fd, req.data, req.len) < 0 || shutdown(fd, SHUT_WR) < 0 || read_all(fd, &reply, MAX_REPLY) < 0)
        return cni_error(&in, path, strerror(errno)); /* what the agent did is unknown: the runtime retries */

    /* "<code> <out> <err>\n" */
    put(&reply, "", 1);
    char *nl = memchr(reply.data, '\n', reply.len - 1);
    int code;
    size_t out_len, err_len;
    if (!nl || sscanf(reply.data, "%d %zu %zu", &code, &out_len, &err_len) != 3 ||
        (size_t)(reply.data + reply.len - 1 - (nl + 1)) != out_len + err_len)
        return cni_error(&in, path, "the agent's reply was malformed or cut short");
    const char *body = nl + 1;
    if (write_all(2, body + out_len, err_len) < 0 || write_all(1, body, out_len) < 0)
        return 1;
    return code;
}
