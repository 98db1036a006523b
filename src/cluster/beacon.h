/* beacon.h — the node side of the LAN beacon (private to src/cluster; see beacon.c). The
 * receiving side, beacon_discover, is public (strata/cluster.h). */
#ifndef STRATA_BEACON_H
#define STRATA_BEACON_H

#include "strata/cluster.h"

/* A UDP socket allowed to broadcast, or < 0 with err set. The caller closes it. */
int beacon_socket(st_err *err);

/* Sends one signed announcement of this node (id, listen "HOST:PORT", protocol version) to
 * UDP `port` on the broadcast address of every IPv4 interface that has one. Returns 0, or
 * ST_ERR_NET when no interface took it. */
int beacon_announce(int fd, int port, const xport_key *key, const char *node_id, const char *listen, st_err *err);

/* Parses "PORT[:SECONDS]" (seconds default 3). Returns 0 or -1. */
int beacon_parse_spec(const char *spec, int *port, double *seconds);

#endif
