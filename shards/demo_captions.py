"""Captions for demo motions: paraphrase templates per action, subjects and connectives.

A template is a verb phrase whose verbs are written in brackets, `[walk] forward{spd}`,
so one template gives both the third person ("walks forward") and the gerund ("walking
forward") that connectives like "while" and "before" need. Slots: {spd} speed words,
{n} repetitions ("twice"), {num} a number word, {s} a plural ending, {side} left/right,
{pos} the subject's possessive. Parameters are sometimes left unsaid, as annotators do,
which makes near-duplicate captions for different motions (the false negatives DropTriple
is about); exact duplicates stay rare.

Caption lines use HumanML3D's format `caption#tokens#start#end`; our tokens field is the
lowercased words, each tagged `/OTHER` (no part-of-speech tagger is involved).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from shards.demo_actions import FPS, Plan, Unit

SUBJECTS = (  # (subject, possessive, pronoun used to start a later sentence)
    ("a person", "their", "the person"), ("someone", "their", "the person"),
    ("the person", "their", "the person"), ("a man", "his", "he"), ("the man", "his", "he"),
    ("a woman", "her", "she"), ("the woman", "her", "she"), ("a guy", "his", "he"),
    ("a lady", "her", "she"), ("a human", "their", "the person"), ("a figure", "its", "it"),
    ("an individual", "their", "the person"), ("a boy", "his", "he"), ("a girl", "her", "she"),
    ("the guy", "his", "he"), ("the lady", "her", "she"), ("the boy", "his", "he"),
    ("the girl", "her", "she"), ("a child", "their", "the child"), ("a young man", "his", "he"),
    ("an old man", "his", "he"), ("a young woman", "her", "she"), ("the figure", "its", "it"),
    ("a character", "their", "the character"), ("the character", "their", "the character"),
    ("a stick figure", "its", "it"), ("a dancer", "their", "the dancer"),
    ("an athlete", "their", "the athlete"),
)
TERSE_SUBJECTS = (("a person", "their", "the person"), ("a human", "their", "the person"),
                  ("someone", "their", "the person"))
_ENDINGS = (  # how a caption may close, as annotators often add
    "", "", "", "", "", "", " and then stops", " and stops", " and comes to a stop",
    " and then stands still", " before standing still", " and then pauses", " and then rests",
    " and returns to standing",
)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
_REPS = {1: ["", " once", " one time"], 2: [" twice", " two times"], 3: [" three times", " thrice"]}
_SPEED = {
    "slow": [" slowly", " at a slow pace", " very slowly", " in a slow manner"],
    "normal": ["", "", "", " at a normal pace", " at a steady pace", " normally"],
    "fast": [" quickly", " fast", " at a fast pace", " rapidly", " very quickly"],
}
_DOUBLING = {
    "run", "sit", "jog", "hop", "step", "side-step", "sidestep", "clap", "spin", "squat", "get", "put",
    "jab", "grab", "stop",
}
_OMIT_PARAMETER = 0.2  # an annotator leaves the speed or count unsaid


def conjugate(verb: str, form: str) -> str:
    """"third" (walks) or "gerund" (walking) of a base verb."""
    if form == "third":
        if verb == "do":
            return "does"
        return verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "o")) else "s")
    if verb in _DOUBLING:
        return verb + verb[-1] + "ing"
    if verb.endswith("e") and not verb.endswith("ee"):
        return verb[:-1] + "ing"
    return verb + "ing"


def _render(template: str, slots: dict[str, str], form: str) -> str:
    text = template.format_map(slots)
    return re.sub(r"\[([\w-]+)\]", lambda m: conjugate(m.group(1), form), text)


# ----------------------------------------------------------------------------- templates
Templates = Callable[[dict[str, Any]], list[str]]


def _both_or_one(p: dict[str, Any], both: list[str], one: list[str]) -> list[str]:
    return both if p.get("side") == "both" else one


TEMPLATES: dict[str, Templates] = {
    "walk_forward": lambda p: [
        "[walk] forward{spd}", "[walk] straight ahead{spd}", "[take] a few steps forward{spd}",
        "[move] forward{spd}", "[walk]{spd} in a straight line", "[walk] forwards{spd}",
        "[stroll] forward{spd}" if p["speed"] != "fast" else "[stride] forward{spd}",
    ],
    "walk_backward": lambda p: [
        "[walk] backward{spd}", "[walk] backwards{spd}", "[step] back{spd}",
        "[take] a few steps backward{spd}", "[move] backwards{spd}", "[back] up{spd}",
    ],
    "run_forward": lambda p: [
        "[run] forward{spd}", "[run] straight ahead{spd}", "[run]{spd} in a straight line",
        "[jog] forward{spd}" if p["speed"] == "slow" else "[sprint] forward{spd}",
        "[run] forwards{spd}",
    ],
    "jog_in_place": lambda p: [
        "[jog] in place{spd}", "[run] on the spot{spd}", "[jog] on the spot{spd}",
        "[run] in place{spd}", "[jog]{spd} without moving forward",
    ],
    "march_in_place": lambda p: [
        "[march] in place{spd}", "[march] on the spot{spd}", "[lift] {pos} knees high{spd}",
        "[march]{spd} without moving", "[step] in place lifting {pos} knees{spd}",
    ],
    "side_step": lambda p: [
        "[step] to the {side}{spd}", "[side-step] to the {side}{spd}", "[shuffle] sideways to the {side}",
        "[move] sideways to {pos} {side}{spd}", "[take] a few steps to the {side}{spd}",
        "[sidestep] {side}{spd}",
    ],
    "turn": lambda p: [
        "[turn] to the {side}", "[turn] {side}", "[turn] 90 degrees to the {side}",
        "[rotate] to {pos} {side}", "[turn] {pos} body to the {side}",
    ] if p["angle"] == 90 else [
        "[turn] around to the {side}", "[turn] all the way around", "[turn] around",
        "[do] a half turn to the {side}", "[turn] around over {pos} {side} shoulder",
        "[turn] 180 degrees to the {side}",
    ],
    "walk_circle": lambda p: [
        "[walk] in a circle to the {side}", "[walk] around in a circle", "[walk] in a circle turning {side}",
        "[circle] around to the {side}", "[walk] in a full circle, turning to the {side}",
        "[walk] a circle",
    ],
    "spin": lambda p: [
        "[spin] around{n}", "[spin] to the {side}{n}", "[do] a full turn to the {side}",
        "[twirl] around{n}", "[spin] in place{n}", "[spin] {side}{n}",
    ] if p["reps"] == 1 else [
        "[spin] around{n}", "[spin] to the {side}{n}", "[do] {num} full turns to the {side}",
        "[twirl] around{n}", "[spin] in place{n}", "[spin] {side}{n}",
    ],
    "jump": lambda p: [
        "[jump]{n}", "[jump] up{n}", "[jump] in place{n}", "[hop] up and down{n}",
        "[jump] straight up{n}", "[do] {num} vertical jump{s}",
    ] if p["direction"] == "up" else [
        "[jump] forward{n}", "[leap] forward{n}", "[do] {num} forward jump{s}",
        "[jump] ahead{n}", "[hop] forward{n}", "[jump] forwards{n}",
    ],
    "hop_one_leg": lambda p: [
        "[hop] on {pos} {side} leg{n}", "[hop] on the {side} foot{n}", "[jump] on one leg{n}",
        "[hop] on one foot{n}", "[balance] on the {side} leg and [hop]{n}", "[hop] on {pos} {side} foot{n}",
    ],
    "jumping_jacks": lambda p: [
        "[do] jumping jacks", "[do] {num} jumping jacks", "[perform] jumping jacks{n}",
        "[do] star jumps{n}", "[perform] {num} jumping jacks", "[jump] spreading {pos} arms and legs{n}",
    ],
    "squat": lambda p: [
        "[squat] down{n}{spd}", "[do] {num} squat{s}{spd}", "[squat] down and [stand] back up{n}",
        "[crouch] down and [get] back up{n}", "[bend] {pos} knees and [squat]{n}", "[squat]{n}{spd}",
    ],
    "sit": lambda p: [
        "[sit] down and [stand] back up", "[sit] down on a chair and [get] up again",
        "[take] a seat and then [stand] up", "[sit] down for a moment then [rise]",
        "[sit] down briefly before standing up", "[lower] {pos} body onto a seat and [get] up",
    ],
    "bow": lambda p: [
        "[bow]", "[bow] forward", "[take] a bow", "[bend] forward at the waist", "[bow] politely",
        "[bow] {pos} head and upper body",
    ] if p["variant"] == "slight" else [
        "[bow] deeply", "[take] a deep bow", "[bend] far forward at the waist", "[bow] low",
        "[do] a deep bow", "[bow] down deeply",
    ],
    "kick": lambda p: [
        "[kick] with {pos} {side} leg{n}", "[kick] {pos} {side} foot forward{n}",
        "[kick] forward with the {side} foot{n}", "[kick] the air with {pos} {side} leg{n}",
        "[kick]{n} using the {side} leg", "[do] {num} {side} kick{s}", "[kick]{n}",
    ],
    "punch": lambda p: _both_or_one(p, [
        "[punch] with both hands{n}", "[throw] punches with alternating fists", "[box] the air",
        "[punch] forward with both fists", "[throw] left and right punches", "[jab] with both arms",
    ], [
        "[punch] with {pos} {side} hand{n}", "[punch] forward with {pos} {side} fist{n}",
        "[jab] with the {side} arm{n}", "[throw] {num} punch{es} with the {side} hand",
        "[punch] the air with {pos} {side} arm{n}", "[punch]{n} with the {side} fist",
    ]),
    "throw": lambda p: [
        "[throw] something with {pos} {side} hand", "[throw] a ball with the {side} arm",
        "[make] an overhand throw with the {side} hand", "[pretend] to throw something with the {side} hand",
        "[throw] an object overhand using {pos} {side} arm", "[throw] something",
    ],
    "wave": lambda p: _both_or_one(p, [
        "[wave] with both hands", "[wave] both arms above {pos} head", "[raise] both hands and [wave]",
        "[wave] both hands back and forth",
    ], [
        "[wave] with {pos} {side} hand", "[wave] {pos} {side} hand", "[raise] the {side} hand and [wave]",
        "[wave] hello with the {side} hand", "[wave] {pos} {side} arm back and forth", "[wave]",
    ]),
    "raise_hand": lambda p: _both_or_one(p, [
        "[raise] both hands", "[lift] both arms above {pos} head", "[put] both hands up",
        "[raise] both arms up high", "[hold] both arms up", "[raise] {pos} hands over {pos} head",
    ], [
        "[raise] {pos} {side} hand", "[lift] the {side} arm up", "[put] {pos} {side} hand up",
        "[hold] up {pos} {side} arm", "[raise] the {side} arm above {pos} head", "[raise] one hand",
    ]),
    "clap": lambda p: [
        "[clap]{n}{spd}", "[clap] {pos} hands{n}", "[clap] {pos} hands together{n}{spd}",
        "[applaud]{spd}", "[clap] {pos} hands {num} times", "[clap] in front of {pos} chest{n}",
    ],
    "arm_circles": lambda p: _both_or_one(p, [
        "[circle] both arms", "[make] circles with both arms", "[rotate] {pos} arms in circles",
        "[swing] both arms in circles", "[do] arm circles", "[hold] {pos} arms out and [circle] them",
    ], [
        "[make] circles with {pos} {side} arm", "[circle] the {side} arm", "[rotate] {pos} {side} arm",
        "[swing] {pos} {side} arm in circles", "[do] arm circles with the {side} arm",
    ]),
    "stretch": lambda p: [
        "[stretch] {pos} arms above {pos} head", "[reach] up and [stretch]", "[stretch] upwards",
        "[stretch] both arms up high", "[raise] {pos} arms and [stretch]",
    ] if p["variant"] == "up" else [
        "[stretch] {pos} arms up and [lean] to the {side}", "[lean] to the {side} with arms overhead",
        "[stretch] to the {side}", "[bend] sideways to the {side} with {pos} arms raised",
        "[do] a side stretch to the {side}",
    ],
    "pick_up": lambda p: [
        "[bend] down and [pick] something up", "[pick] something up from the floor",
        "[reach] down to the ground and [pick] up an object", "[lean] over to pick something up",
        "[pick] up something with {pos} {side} hand", "[bend] over and [grab] something off the ground",
    ],
    "lunge": lambda p: [
        "[lunge] forward with {pos} {side} leg{n}", "[do] {num} lunge{s} with the {side} leg",
        "[step] forward into a lunge on the {side} leg{n}", "[lunge]{n}",
        "[do] a {side} leg lunge{n}", "[lunge] with the {side} foot in front{n}",
    ],
    "look_around": lambda p: [
        "[look] around", "[look] to the {side} and then the other way", "[turn] {pos} head to look around",
        "[glance] around", "[look] {side} and {other}", "[look] around in both directions",
    ],
    "stand": lambda p: [
        "[stand] still", "[stand] in place for a moment", "[wait] for a moment", "[pause] briefly",
        "[remain] standing", "[stand] idle",
    ],
}


# ----------------------------------------------------------------------------- assembly

def _choice(rng: np.random.Generator, options: list[str] | tuple[Any, ...]) -> Any:
    return options[int(rng.integers(len(options)))]


def _slots(params: dict[str, Any], possessive: str, rng: np.random.Generator) -> dict[str, str]:
    reps = int(params.get("reps", 1))
    side = params.get("side", params.get("variant", ""))
    speed = params.get("speed", "normal")
    reps_words = _REPS.get(reps, [f" {_NUMBERS[min(reps, 8)]} times"])
    return {
        "spd": "" if rng.random() < _OMIT_PARAMETER else _choice(rng, _SPEED[speed]),
        "n": "" if rng.random() < _OMIT_PARAMETER else _choice(rng, reps_words),
        "num": _NUMBERS[min(reps, 8)] if reps > 1 else _choice(rng, ("one", "a")),
        "s": "s" if reps > 1 else "",
        "es": "es" if reps > 1 else "",
        "side": side,
        "other": "right" if side == "left" else "left",
        "pos": possessive,
    }


def _phrase(action: str, params: dict[str, Any], possessive: str, form: str, rng: np.random.Generator) -> str:
    template = _choice(rng, TEMPLATES[action](params))
    return _render(template, _slots(params, possessive, rng), form)


def _unit_phrases(unit: Unit, possessive: str, rng: np.random.Generator) -> tuple[str, str]:
    """(third person, gerund) phrases of a unit, overlays joined with "while"."""
    base3, base_ger = (_phrase(unit.action, unit.params, possessive, f, rng) for f in ("third", "gerund"))
    if unit.overlay is None:
        return base3, base_ger
    name, params = unit.overlay
    gest3, gest_ger = (_phrase(name, params, possessive, f, rng) for f in ("third", "gerund"))
    style = int(rng.integers(3))
    if style == 0:
        return f"{base3} while {gest_ger}", f"{base_ger} while {gest_ger}"
    if style == 1:
        return f"{gest3} while {base_ger}", f"{gest_ger} while {base_ger}"
    return f"{base3} and {gest3} at the same time", f"{base_ger} while {gest_ger}"


def _join(phrases: list[tuple[str, str]], subject: tuple[str, str, str], rng: np.random.Generator) -> str:
    name, _, pronoun = subject
    if len(phrases) == 2 and rng.random() < 0.15:
        return f"after {phrases[0][1]}, {name} {phrases[1][0]}"
    if len(phrases) >= 2 and rng.random() < 0.1:
        text = f"first, {name} {phrases[0][0]}"
    else:
        text = f"{name} {phrases[0][0]}"
    for i, (third, gerund) in enumerate(phrases[1:], start=1):
        last = i == len(phrases) - 1
        options = [
            f", then {third}", f" then {third}", f" and then {third}", f", and then {third}",
            f". after that, {pronoun} {third}", f". next, {pronoun} {third}", f" before {gerund}",
            f", followed by {gerund}", f", after which {pronoun} {third}", f" and {third}",
        ]
        if last and len(phrases) >= 3:
            options += [f", and finally {third}", f". finally, {pronoun} {third}"]
        text += _choice(rng, options)
    return text


def _finish(text: str, rng: np.random.Generator, ending: bool = True) -> str:
    if ending:
        text += _choice(rng, _ENDINGS)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.8 else "")


def motion_captions(plan: Plan, rng: np.random.Generator, count: int = 3, terse: bool = False) -> list[str]:
    """`count` distinct captions describing the whole plan; `terse`: KIT-ML's plainer style
    (a few neutral subjects, no closing phrase)."""
    captions: list[str] = []
    for _ in range(count * 10):
        subject = _choice(rng, TERSE_SUBJECTS if terse else SUBJECTS)
        units = [u for u in plan.units if u.action != "stand" or rng.random() < 0.5] or plan.units
        text = _finish(_join([_unit_phrases(u, subject[1], rng) for u in units], subject, rng), rng,
                       ending=not terse)
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return captions


def unit_caption(unit: Unit, rng: np.random.Generator, terse: bool = False) -> str:
    """Caption of one unit alone (for a sub-clip caption with start/end)."""
    subject = _choice(rng, TERSE_SUBJECTS if terse else SUBJECTS)
    return _finish(f"{subject[0]} {_unit_phrases(unit, subject[1], rng)[0]}", rng, ending=False)


_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def mirror_caption(text: str) -> str:
    """HumanML3D's mirror rule for captions: swap the words left and right."""
    return re.sub(r"\b(left|right|Left|Right)\b", lambda m: _SWAP[m.group(1)], text)


def caption_line(text: str, start: float = 0.0, end: float = 0.0) -> str:
    """`caption#tokens#start#end` (start = end = 0: the caption covers the whole clip)."""
    words = re.findall(r"[a-z0-9'-]+", text.lower())
    tokens = " ".join(f"{w}/OTHER" for w in words)
    return f"{text}#{tokens}#{round(start, 2)!r}#{round(end, 2)!r}"


def subclip_span(plan: Plan, unit_index: int) -> tuple[float, float]:
    """Start and end (seconds) of a unit inside its motion."""
    first, last = plan.segments[unit_index]
    return first / FPS, last / FPS
