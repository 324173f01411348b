"""A malicious site for the Flower tests: deer's own ClientApp, except that a SuperNode started with
--node-config "... attack=true" tampers with its reply, a different way each round (ROUND_ATTACKS).
The in-process engine applies the same table in tests/test_flower.py, so both paths can be compared."""
import time

from deer.fed import flower_app

from test_untrusted_replies import ATTACKS, SAMPLE_ATTACKS, _map, _with

HUGE = 1e29        # a finite update of norm ~1e30: accepted as is without update_norm_bound
SLEEP_S = 60       # longer than the test's client_timeout_s: the reply comes too late

# round -> (name, attack on the ClientUpdate (a str: no reply), what the server's log must say)
ROUND_ATTACKS = [
    ("wrong shape", ATTACKS["wrong shape"][0], "left out: factors: .* is \\("),
    ("wrong dtype", ATTACKS["wrong dtype"][0], "left out: .*torch.float64, the server sent"),
    ("missing layer", ATTACKS["missing layer"][0], "left out: factors: 1 missing"),
    ("extra tensor", ATTACKS["unknown tensor"][0], "left out: .*head.weight"),
    ("NaN", ATTACKS["NaN"][0], "left out: .*NaN/Inf"),
    ("huge", lambda r: _map(r, lambda d: {k: v + HUGE for k, v in d.items()}), "update norm .* scaled to update_norm_bound"),
    ("1e9 examples", lambda r: _with(r, num_examples=10**9), "num-examples 1e\\+09 capped"),
    ("fake report", SAMPLE_ATTACKS["report bigger sigma"][0], "left out: .*noise multiplier .* differs"),
    ("never comes", lambda r: "no reply", "left out: no reply"),
]


def attack(rnd: int, upd):
    return upd if isinstance(upd, str) else ROUND_ATTACKS[rnd][1](upd)


def _train(msg, context):
    upd = flower_app.client_update(msg, context)
    if str(context.node_config.get("attack", "false")).lower() == "true":
        upd = attack(int(msg.content["config"]["round"]), upd)
        if isinstance(upd, str):
            time.sleep(SLEEP_S)
            upd = flower_app.client_update(msg, context)
    return flower_app.reply_message(msg, upd)


def _make():
    from flwr.clientapp import ClientApp
    app = ClientApp()
    app.train()(_train)
    app.query()(flower_app._client_query)
    return app


client_app = _make()
