"""
Persona dialogue data for SPT (paper 3.1, 4.1, A.5): ConvAI2 self_original parsing, DailyDialog, JSONL and
a small built-in demo set, the prompt template, tokenization with truncation, batching, dialogue-level splits.

    python data.py FILE                             # stats of a ConvAI2 .txt, a DailyDialog dialogues_*.txt,
                                                    # a .jsonl, or `demo`
    python data.py --download convai2 --dir DIR     # fetch ConvAI2 (ParlAI's archive), keep the self_original files
    python data.py --download dailydialog --dir DIR # fetch DailyDialog (the official archive), keep its dialogue files
"""
import argparse
import gzip
import hashlib
import http.client
import io
import json
import random
import shutil
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import torch

# ParlAI serves ConvAI2 as one archive; the sha256 is the one ParlAI's parlai/tasks/convai2/build.py lists
# (its DownloadableFile for http://parl.ai/downloads/convai2/convai2_fix_723.tgz, which redirects here).
CONVAI2_URL = "https://dl.fbaipublicfiles.com/parlai/convai2/convai2_fix_723.tgz"
CONVAI2_SHA256 = "d0ae89defe2fd0b0a4221eaa642a457d7d40cef475f54798119c7f3b8dd9361d"
CONVAI2_SUFFIX = "_self_original_no_cands.txt"
PERSONA_PREFIX = "your persona: "
# DailyDialog (Li et al., 2017; the paper's A.5) as its authors release it; the sha256 is the one Hugging Face's
# datasets script for it lists (datasets/daily_dialog/dataset_infos.json, 4,475,921 bytes).
DAILYDIALOG_URL = "http://yanran.li/files/ijcnlp_dailydialog.zip"
DAILYDIALOG_SHA256 = "c641e88cbf21fd7c1b57289387f9107d33fe8685a2b37fe8066b82776535ea89"
DAILYDIALOG_PREFIX = "dialogues_"  # the release's dialogue files: dialogues_text.txt (all) and the three splits
DAILYDIALOG_FILES = ("dialogues_text.txt", "dialogues_train.txt", "dialogues_validation.txt", "dialogues_test.txt")
EOU = "__eou__"  # DailyDialog's end of a turn
JSONL_SHAPE = '{"persona": [...], "context": [...], "response": "..."}'
SPEC_HELP = (f"pass a ConvAI2 *{CONVAI2_SUFFIX} file, a DailyDialog {DAILYDIALOG_PREFIX}*.txt file, a .jsonl file "
             f"(one {JSONL_SHAPE} per line), or `demo`; `python data.py --download convai2 --dir DIR` fetches "
             "ConvAI2, `--download dailydialog` DailyDialog")


class DataError(ValueError):
    """Bad or missing data; the message names the file (and line) and says what is expected."""


@dataclass
class Example:
    persona: list[str]    # P: the responding speaker's persona sentences (may be empty, as for DailyDialog)
    context: list[str]    # U = [h1, m1, ..., hn]: alternating human/machine, ends with the human turn
    response: str         # r = mn
    turn: int             # n, 1-based
    dialogue_id: int | str


def dialogue_examples(persona, turns, dialogue_id):
    """Example n of a dialogue with turns [(h1, m1), ..., (hN, mN)]: context [h1, m1, ..., hn], response mn."""
    flat = [u for pair in turns for u in pair]
    return [Example(list(persona), flat[:2 * n + 1], turns[n][1], n + 1, dialogue_id) for n in range(len(turns))]


def _read_lines(path):
    """The lines of a UTF-8 text file, without line ends; a missing or empty file is an error."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; {SPEC_HELP}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); {SPEC_HELP}") from None
    if not text.strip():
        raise DataError(f"{path}:1: the file is empty; {SPEC_HELP}")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def load_convai2(path):
    """Parse a ConvAI2 *_self_original_no_cands.txt: `N your persona: ...` lines, then `N human<TAB>machine`
    lines; a dialogue starts at N = 1. dialogue_id is the dialogue's 0-based index in the file."""
    path = Path(path)
    fmt = f"(expected a ConvAI2 *{CONVAI2_SUFFIX} file)"
    dialogues = []  # (first line number, persona, turns)
    expected = 1
    for lineno, line in enumerate(_read_lines(path), 1):
        where = f"{path}:{lineno}"
        num, space, rest = line.partition(" ")
        if not (num.isascii() and num.isdigit() and space):
            raise DataError(f"{where}: expected '<line number> <text>', got {line[:40]!r} {fmt}")
        n = int(num)
        if n == 1:
            dialogues.append((lineno, [], []))
        elif n != expected:
            raise DataError(f"{where}: line number {n}, expected {expected} or 1 "
                            f"(a dialogue starts at 1 and counts up by one) {fmt}")
        expected = n + 1
        start, persona, turns = dialogues[-1]
        if rest.startswith(PERSONA_PREFIX):
            if turns:
                raise DataError(f"{where}: persona line after the dialogue turns; "
                                f"expected all '{PERSONA_PREFIX}' lines before the first turn {fmt}")
            persona.append(rest[len(PERSONA_PREFIX):])
            continue
        parts = rest.split("\t")
        if len(parts) != 2:
            raise DataError(f"{where}: expected 'human<TAB>machine' after the line number, found {len(parts) - 1} "
                            f"tabs {fmt}; the with-candidates and partner-persona variants are not supported")
        if not persona:
            raise DataError(f"{where}: the dialogue starting at line {start} has no '{PERSONA_PREFIX}' line {fmt}")
        if not parts[0].strip() or not parts[1].strip():
            raise DataError(f"{where}: empty human or machine text; expected 'human<TAB>machine' {fmt}")
        turns.append((parts[0], parts[1]))
    for start, persona, turns in dialogues:
        if not turns:
            raise DataError(f"{path}:{start}: the dialogue starting here has no 'human<TAB>machine' turns {fmt}")
    return [ex for i, (_, persona, turns) in enumerate(dialogues) for ex in dialogue_examples(persona, turns, i)]


def load_dailydialog(path):
    """Parse a DailyDialog dialogues_*.txt of the official release: one dialogue a line, every turn followed by
    `__eou__`. The paper (A.5) does not say whose turns it answers, and the authors' public code has no DailyDialog
    reader; here, as in ConvAI2's self_original files, the speaker who opens is the human h and the other the
    machine m, whose turns are the responses: a dialogue [u1, ..., uT] gives example n (n = 1 .. T // 2) with
    context [u1, ..., u(2n-1)] and response u(2n); a last turn nobody answers is context for no one. The persona
    P is empty (DailyDialog has none). dialogue_id is the dialogue's 0-based index in the file; blank lines are
    skipped (counted)."""
    path = Path(path)
    fmt = f"(expected a DailyDialog {DAILYDIALOG_PREFIX}*.txt file: one dialogue a line, every turn followed by {EOU})"
    dialogues, blank = [], 0
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            blank += 1
            continue
        where = f"{path}:{lineno}"
        turns = line.split(EOU)
        if turns[-1].strip():
            raise DataError(f"{where}: the line ends with {turns[-1].strip()[-30:]!r}, not with {EOU} {fmt}")
        turns = [t.strip() for t in turns[:-1]]
        if "" in turns:
            raise DataError(f"{where}: turn {turns.index('') + 1} is empty {fmt}")
        if len(turns) < 2:
            raise DataError(f"{where}: only one turn; a dialogue needs a turn and its response {fmt}")
        dialogues.append(list(zip(turns[0::2], turns[1::2])))
    if blank:
        print(f"{path}: skipped {blank} blank lines", file=sys.stderr)
    if not dialogues:
        raise DataError(f"{path}: no dialogues, only blank lines {fmt}")
    return [ex for i, turns in enumerate(dialogues) for ex in dialogue_examples([], turns, i)]


def load_jsonl(path):
    """One example per line: {"persona": [str], "context": [str], "response": str} plus optional
    "dialogue_id" (int or str; default "line N", i.e. each line its own dialogue: give ids so that
    split_by_dialogue keeps a dialogue's examples together) and "turn" (default (len(context) + 1) // 2).
    context must have odd length: [h1, m1, ..., hn] ends with the human turn. Blank lines are skipped (counted)."""
    path = Path(path)
    examples, blank = [], 0
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            blank += 1
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: bad JSON ({e.msg}, column {e.colno}); "
                            f"expected one {JSONL_SHAPE} per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object {JSONL_SHAPE}, got {type(obj).__name__}")
        missing = {"persona", "context", "response"} - obj.keys()
        unknown = obj.keys() - {"persona", "context", "response", "dialogue_id", "turn"}
        if missing or unknown:
            raise DataError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; expected "
                            f"{JSONL_SHAPE} with optional \"dialogue_id\" and \"turn\"")
        persona, context, response = obj["persona"], obj["context"], obj["response"]
        if not (isinstance(persona, list) and all(isinstance(s, str) for s in persona)):
            raise DataError(f"{where}: \"persona\" must be a list of strings (it may be empty)")
        if not (isinstance(context, list) and context and all(isinstance(s, str) for s in context)):
            raise DataError(f"{where}: \"context\" must be a non-empty list of strings [h1, m1, ..., hn]")
        if len(context) % 2 == 0:
            raise DataError(f"{where}: \"context\" has {len(context)} turns; expected an odd number "
                            f"[h1, m1, ..., hn], alternating human/machine and ending with the human turn to answer")
        if not (isinstance(response, str) and response.strip()):
            raise DataError(f"{where}: \"response\" must be a non-empty string")
        dialogue_id = obj.get("dialogue_id", f"line {lineno}")
        if isinstance(dialogue_id, bool) or not isinstance(dialogue_id, (int, str)):
            raise DataError(f"{where}: \"dialogue_id\" must be an int or a string")
        turn = obj.get("turn", (len(context) + 1) // 2)
        if isinstance(turn, bool) or not isinstance(turn, int) or turn < 1:
            raise DataError(f"{where}: \"turn\" must be an int >= 1 (the 1-based index n of the response)")
        examples.append(Example(persona, context, response, turn, dialogue_id))
    if blank:
        print(f"{path}: skipped {blank} blank lines", file=sys.stderr)
    if not examples:
        raise DataError(f"{path}: no examples, only blank lines; expected one {JSONL_SHAPE} per line")
    return examples


# Written for this project: 6 short persona dialogues as (persona, [(human, machine), ...]).
DEMO_DIALOGUES = [
    (["i keep bees on the roof of my apartment.", "i work night shifts at a bakery.",
      "my favorite season is autumn.", "i am learning to play the cello."],
     [("hi ! how is your evening going ?",
       "pretty good , i just started my shift at the bakery . the bread smells amazing ."),
      ("a night shift ? do you ever get to sleep ?",
       "i sleep in the mornings . my bees are quiet then , so it works out ."),
      ("wait , you have bees ?", "yes , two hives on my roof . the honey goes into some of our pastries ."),
      ("that is so cool . what else do you do for fun ?",
       "i am learning the cello , slowly . my neighbors are very patient ."),
      ("ha , i bet . do you like this time of year ?",
       "autumn is my favorite . cool air , warm bread , and the bees get ready for winter .")]),
    (["i am a retired firefighter.", "i have three grandchildren.", "i grow tomatoes and peppers.",
      "i never miss a baseball game on the radio."],
     [("hello , what keeps you busy these days ?", "mostly my garden . i grow tomatoes and peppers out back ."),
      ("nice ! did you always garden ?",
       "no , i was a firefighter for thirty years . the garden came after i retired ."),
      ("thank you for your service . any family nearby ?",
       "my daughter lives close , so i see my three grandkids every weekend ."),
      ("do they help in the garden ?", "the youngest does . she eats more tomatoes than she picks .")]),
    (["i am a software tester.", "i run marathons.", "i am allergic to cats.", "i speak spanish and french."],
     [("hey , are you training for anything right now ?",
       "yes , a marathon in the spring . i run five mornings a week ."),
      ("wow , how long have you been running ?",
       "about six years . it clears my head after a day of testing software ."),
      ("what does a software tester actually do ?",
       "i try to break programs before the customers do . it is more fun than it sounds ."),
      ("ha . i have two cats who break everything .",
       "then they would make great testers , but i could not visit , i am allergic ."),
      ("oh no ! do you have any pets ?", "just a fish named pixel . no fur , no sneezing ."),
      ("i love that name . do you travel for races ?",
       "sometimes . i ran one in lyon last year and got to practice my french .")]),
    (["i am a high school chemistry teacher.", "i collect old maps.", "i drive an electric car.",
      "i hate cold weather."],
     [("good morning ! any plans for the weekend ?",
       "grading lab reports , sadly . i teach chemistry at the high school ."),
      ("that sounds like a lot of work .",
       "it is , but the students make it worth it . one of them built a battery from lemons ."),
      ("haha , lemons ! what do you do to relax ?", "i collect old maps . i have one of my home town from 1850 ."),
      ("where is home ?", "a small town up north , which is why i moved south . i cannot stand the cold .")]),
    (["i play drums in a band.", "i am a vegetarian.", "i work at a bike repair shop.",
      "my brother is my best friend."],
     [("hi , what do you do for work ?", "i fix bikes at a little repair shop downtown ."),
      ("do you ride a lot too ?", "every day . i ride to band practice with my drum sticks in my backpack ."),
      ("you are in a band ? what kind of music ?", "loud rock , mostly . my brother plays guitar and sings ."),
      ("fun ! do you play shows ?",
       "about once a month . last week we played a vegetarian food festival , perfect for me ."),
      ("what did you eat there ?", "the best mushroom tacos i have ever had .")]),
    (["i live on a sailboat.", "i am a nurse.", "i love reading mystery novels.", "i can not swim."],
     [("hello there ! where do you live ?", "on a sailboat in the harbor , believe it or not ."),
      ("really ? is that comfortable ?", "it is cozy . a small kitchen , but the view of the water is worth it ."),
      ("can you swim well then ?", "funny thing , i can not swim at all . i always wear a life jacket ."),
      ("ha ! what do you do for a living ?", "i am a nurse at the children's hospital . long shifts , but i love it ."),
      ("what do you do after a long shift ?", "i read mystery novels on deck until i fall asleep ."),
      ("any good ones lately ?",
       "i just finished one about a lighthouse keeper who vanishes . i guessed the ending wrong .")]),
]


def demo_examples():
    """30 examples from 6 short dialogues written for this project (smoke tests, demos)."""
    return [ex for i, (persona, turns) in enumerate(DEMO_DIALOGUES) for ex in dialogue_examples(persona, turns, i)]


# The routing check: four kinds of context, told apart by their topic words, whose responses each follow a
# pattern of their own that the context does not reveal (a pet owner's answer names a colour, a cook's a number
# of siblings, ...). One prompt must hedge between the four patterns; a prompt per kind, chosen from the
# context, need not. Written for this project.
ROUTING_KINDS = {
    "pets": {"persona": ["i have a {pet} named {name} .", "my {pet} sleeps on my bed .", "i walk my {pet} every {time} .",
                         "i adopted a {pet} from a shelter .", "my {pet} loves {toy} ."],
             "question": ["do you have a {pet} ?", "what is your {pet} like ?", "does your {pet} like {toy} ?",
                          "who walks your {pet} ?"],
             "slots": {"pet": ["dog", "cat", "puppy", "kitten", "rabbit"], "name": ["max", "bella", "charlie", "luna"],
                       "time": ["morning", "evening", "night"], "toy": ["tennis balls", "squeaky toys", "treats"]},
             "response": "my favorite color is {answer} .", "answers": ["red", "blue", "green", "yellow"]},
    "food": {"persona": ["i love to cook {dish} .", "my favorite food is {dish} .", "i bake {bread} every {time} .",
                         "i grow {vegetable} in my garden .", "i eat {dish} with {vegetable} ."],
             "question": ["what do you like to cook ?", "do you eat {dish} ?", "have you tried {bread} ?",
                          "what is for dinner tonight ?"],
             "slots": {"dish": ["pasta", "soup", "pizza", "curry", "tacos"], "bread": ["bread", "bagels", "muffins"],
                       "time": ["morning", "weekend", "sunday"], "vegetable": ["tomatoes", "onions", "peppers", "carrots"]},
             "response": "i have {answer} brothers and one sister .", "answers": ["two", "three", "four", "five"]},
    "sports": {"persona": ["i play {sport} every {time} .", "i run {distance} miles a day .", "my team won the {sport} cup .",
                           "i watch {sport} on television .", "i train at the {place} ."],
               "question": ["do you play {sport} ?", "how far do you run ?", "who is your favorite {sport} team ?",
                            "do you go to the {place} ?"],
               "slots": {"sport": ["soccer", "tennis", "basketball", "hockey", "golf"], "time": ["morning", "weekend", "day"],
                         "distance": ["two", "five", "ten"], "place": ["gym", "stadium", "park"]},
               "response": "i work as a {answer} in a big hospital .", "answers": ["nurse", "doctor", "cleaner", "cook"]},
    "music": {"persona": ["i play the {instrument} .", "i sing in a {group} .", "my favorite band plays {genre} .",
                          "i listen to {genre} every {time} .", "i write songs on my {instrument} ."],
              "question": ["do you play an instrument ?", "what music do you like ?", "do you like {genre} ?",
                           "have you ever sung in a {group} ?"],
              "slots": {"instrument": ["guitar", "piano", "violin", "drums", "flute"], "group": ["choir", "band", "duo"],
                        "genre": ["jazz", "rock", "pop", "blues"], "time": ["morning", "evening", "night"]},
              "response": "we moved here from {answer} last year .", "answers": ["paris", "tokyo", "lima", "cairo"]},
}


def routing_examples(n=1200, seed=0, kinds=None):
    """n one-turn examples of the routing check, kinds in a seeded random order; dialogue_id is "KIND-i".
    kinds: names of ROUTING_KINDS to draw from (default: all four).

    Each context has two persona sentences and a question from one kind's templates (the kind shows in the
    topic words); the response is that kind's pattern with a random answer, so log 4 nats per example are
    left to chance however well a prompt learns.
    """
    rng = random.Random(seed)
    kinds = sorted(kinds or ROUTING_KINDS)
    examples = []
    for i in range(n):
        kind = rng.choice(kinds)
        spec = ROUTING_KINDS[kind]
        fill = lambda template: template.format(**{k: rng.choice(v) for k, v in spec["slots"].items()})  # noqa: E731
        persona = [fill(t) for t in rng.sample(spec["persona"], 2)]
        response = spec["response"].format(answer=rng.choice(spec["answers"]))
        examples.append(Example(persona, [fill(rng.choice(spec["question"]))], response, 1, f"{kind}-{i}"))
    return examples


FIRST_RUN_KINDS = ("food", "pets")  # `--data two-kinds`, what `python train.py` trains on when ConvAI2 is absent


def routing_kind(example):
    """The kind of a routing_examples() example, read from its dialogue_id "KIND-i"."""
    return str(example.dialogue_id).rsplit("-", 1)[0]


def load_examples(spec):
    """spec "demo" -> demo_examples(); "routing" -> routing_examples(); "two-kinds" -> 580 routing examples of
    two kinds only (FIRST_RUN_KINDS: 480 to train and 100 to hold out); a *.jsonl path -> load_jsonl;
    a dialogues_*.txt path (DailyDialog's file names) -> load_dailydialog; any other path -> load_convai2."""
    if str(spec) == "demo":
        return demo_examples()
    if str(spec) == "routing":
        return routing_examples()
    if str(spec) == "two-kinds":
        return routing_examples(580, kinds=FIRST_RUN_KINDS)
    path = Path(spec)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    return load_dailydialog(path) if path.name.startswith(DAILYDIALOG_PREFIX) else load_convai2(path)


def render_prompt(persona, context):
    """The context C = {P, U} of paper 3.1 as text, in the template of the authors' code:
    given persona: {P}; context: Q: h1 R: m1 ... Q: hn R:
    An example without a persona (P empty, as in DailyDialog) takes it without its persona part:
    context: Q: h1 R: m1 ... Q: hn R:"""
    turns = " ".join(("Q: " if i % 2 == 0 else "R: ") + u for i, u in enumerate(context))
    return f"given persona: {' '.join(persona)}; context: {turns} R:" if persona else f"context: {turns} R:"


def prompt_text(ex):
    return render_prompt(ex.persona, ex.context)


def target_text(ex):
    return " " + ex.response


@dataclass
class EncodedExample:
    prompt_ids: list[int]  # [bos if tokenizer.add_bos] + prompt tokens, after truncation
    target_ids: list[int]  # response tokens + [eos]; the loss is taken on these only
    context_text: str      # prompt text after dropping old turns: the retriever's context C (BLEU matrix)
    example: Example


def encode_target(prompt, body, ex, tokenizer):
    """The response's tokens as they follow the prompt when prompt + target is encoded as one text.

    body = tokenizer.encode(prompt). Encoding " " + response on its own would give sentencepiece tokenizers
    (Llama-2: Metaspace / prepended "▁") a stray "▁" token that never follows "R:" in whole text.
    """
    whole = tokenizer.encode(prompt + target_text(ex))
    if whole[:len(body)] == body:
        return whole[len(body):]
    return tokenizer.encode(target_text(ex))  # a merge across the boundary: no split of `whole` fits the prompt


def encode_example(ex, tokenizer, max_len, new_tokens=None):
    """Tokenize to len(prompt_ids) + len(target_ids) <= max_len.
    Truncation: target capped at max_len // 2 tokens (cut on the right, eos kept last); then the oldest Q/R
    exchanges are dropped (the persona and the last human turn always stay); only then prompt tokens are cut
    from the left (after bos), which eats into "given persona: ..." first.
    new_tokens (decoding): the prompt keeps room for that many generated tokens instead of for the target,
    so the context kept does not depend on the reference response."""
    if max_len < 4:
        raise ValueError(f"max_len={max_len} is too small; use at least 4 so that a prompt and a target both fit")
    context = ex.context
    body = tokenizer.encode(render_prompt(ex.persona, context))
    target = encode_target(render_prompt(ex.persona, context), body, ex, tokenizer)[:max_len // 2 - 1] + [tokenizer.eos_id]
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    if new_tokens is not None and new_tokens >= max_len - len(bos):
        raise ValueError(f"{new_tokens} new tokens leave no room for the context within max_len={max_len}: "
                         f"lower --max-new-tokens")
    keep = max_len - (len(target) if new_tokens is None else new_tokens) - len(bos)  # prompt tokens after bos, >= 1
    while len(body) > keep and len(context) > 1:
        context = context[2:]
        body = tokenizer.encode(render_prompt(ex.persona, context))
    return EncodedExample(bos + body[max(0, len(body) - keep):], target, render_prompt(ex.persona, context), ex)


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) long, prompt + target, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    target_mask: torch.Tensor     # (B, T) bool, True where input_ids[:, t] is a target token (eos included)
    context_ids: torch.Tensor     # (B, Tc) long, prompt tokens only (the retriever's C), right-padded
    context_mask: torch.Tensor    # (B, Tc) long, 1 = real token
    context_texts: list[str]
    examples: list[Example]

    def to(self, device):
        """The batch with its tensors on device (to_device: a GPU gets them without the host waiting)."""
        device = torch.device(device)
        return replace(self, **{f.name: to_device(getattr(self, f.name), device)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


def to_device(tensor, device):
    """tensor on device. A host tensor goes to a GPU through pinned memory with non_blocking, so the host
    queues the copy and goes on; from pageable memory CUDA would wait for the device to finish first."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def collate(encoded, pad_id):
    """Stack EncodedExamples into a right-padded Batch."""
    if not encoded:
        raise ValueError("collate needs at least one EncodedExample")
    B = len(encoded)
    T = max(len(e.prompt_ids) + len(e.target_ids) for e in encoded)
    Tc = max(len(e.prompt_ids) for e in encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    target_mask = torch.zeros(B, T, dtype=torch.bool)
    context_ids = torch.full((B, Tc), pad_id, dtype=torch.long)
    context_mask = torch.zeros(B, Tc, dtype=torch.long)
    for b, e in enumerate(encoded):
        p, t = len(e.prompt_ids), len(e.target_ids)
        input_ids[b, :p + t] = torch.tensor(e.prompt_ids + e.target_ids)
        attention_mask[b, :p + t] = 1
        target_mask[b, p:p + t] = True
        context_ids[b, :p] = torch.tensor(e.prompt_ids)
        context_mask[b, :p] = 1
    return Batch(input_ids, attention_mask, target_mask, context_ids, context_mask,
                 [e.context_text for e in encoded], [e.example for e in encoded])


def shard(batch, rank, world):
    """Process `rank`'s contiguous slice of a batch, for data parallelism (the batch size divides by world)."""
    size = len(batch.examples) // world
    rows = slice(rank * size, (rank + 1) * size)
    return replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in fields(batch)})


def left_pad_prompts(encoded, pad_id):
    """Prompt tokens only, left-padded so that generation continues every row at the same position.
    Returns ids (B, T) long and mask (B, T) long (1 = real token)."""
    if not encoded:
        raise ValueError("left_pad_prompts needs at least one EncodedExample")
    T = max(len(e.prompt_ids) for e in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for b, e in enumerate(encoded):
        p = len(e.prompt_ids)
        ids[b, T - p:] = torch.tensor(e.prompt_ids)
        mask[b, T - p:] = 1
    return ids, mask


def split_by_dialogue(examples, n_test, seed=0, shuffle=True):
    """(train, test) with no dialogue in both. n_test: a number of dialogues (int) or a fraction (float in (0, 1)).
    shuffle=False takes the LAST n_test dialogues (in order of appearance) as the test set; shuffle=True takes
    the last n_test of a seeded shuffle. Examples keep their input order within each part."""
    ids = list(dict.fromkeys(ex.dialogue_id for ex in examples))
    n = round(n_test * len(ids)) if isinstance(n_test, float) else n_test
    if not 1 <= n < len(ids):
        raise ValueError(f"n_test={n_test} gives {n} test dialogues out of {len(ids)}; "
                         f"need at least 1 and fewer than all")
    if shuffle:
        random.Random(seed).shuffle(ids)
    test_ids = set(ids[len(ids) - n:])
    return ([ex for ex in examples if ex.dialogue_id not in test_ids],
            [ex for ex in examples if ex.dialogue_id in test_ids])


def batches(encoded, batch_size, pad_id, seed=0, epoch=0, skip=0, shuffle=True) -> Iterator[Batch]:
    """Collated batches of one epoch; the order depends only on (seed, epoch) so a run resumes exactly by
    passing the same epoch and skip = the number of batches of that epoch already done. Last batch may be short."""
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    for start in range(skip * batch_size, len(order), batch_size):
        yield collate([encoded[i] for i in order[start:start + batch_size]], pad_id)


def stats(examples):
    """Counts for a quick look at a data set."""
    dialogues = {ex.dialogue_id for ex in examples}
    return {"dialogues": len(dialogues), "examples": len(examples),
            "mean_turns": len(examples) / len(dialogues),
            "max_turn": max(ex.turn for ex in examples),
            "mean_persona": sum(len(ex.persona) for ex in examples) / len(examples)}


def _progress(done, total, t0):
    """One progress line on stderr: MB done / total, percent, rate, ETA."""
    rate = done / max(time.time() - t0, 1e-6)
    if total:
        eta = int((total - done) / max(rate, 1e-6))
        line = (f"{done / 1e6:9.1f} / {total / 1e6:.1f} MB {100 * done / total:5.1f}% "
                f"{rate / 1e6:6.2f} MB/s ETA {eta // 60}m{eta % 60:02d}s")
    else:
        line = f"{done / 1e6:9.1f} MB {rate / 1e6:6.2f} MB/s"
    print("\r" + line, end="", file=sys.stderr, flush=True)


def _fetch(url, out, timeout):
    """Stream url into the file out with a progress line; return the sha256 hex digest."""
    digest, done = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(out, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        t0 = last = time.time()
        while chunk := response.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if time.time() - last > 0.25:
                _progress(done, total, t0)
                last = time.time()
        _progress(done, total, t0)
        print(file=sys.stderr)
    if total and done != total:
        raise DataError(f"{url}: got {done} of {total} bytes; the download was cut, run the command again")
    return digest.hexdigest()


def _unpack_convai2(archive, url, dest):
    """Copy the *_self_original_no_cands.txt members of a tar.gz into dest (flat); return their paths."""
    written = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name.endswith(CONVAI2_SUFFIX):
                    part = dest / (name + ".part")
                    with tar.extractfile(member) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    written.append(part.replace(dest / name))
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{url}: not a valid tar.gz archive ({e}); check --url") from None
    if not written:
        raise DataError(f"{url}: the archive holds no *{CONVAI2_SUFFIX} file; check --url")
    return written


def _unpack_dailydialog(archive, url, dest):
    """Copy the DAILYDIALOG_FILES of a zip into dest (flat): dialogues_text.txt from the archive, the three
    splits from the zips inside it (train.zip, validation.zip, test.zip). Return their paths."""
    written = []

    def copy_from(zf):
        for name in zf.namelist():
            base = name.rsplit("/", 1)[-1]
            if base in DAILYDIALOG_FILES and not name.startswith("__MACOSX"):
                part = dest / (base + ".part")
                part.write_bytes(zf.read(name))
                written.append(part.replace(dest / base))
            elif name.endswith(".zip") and not name.startswith("__MACOSX"):
                with zipfile.ZipFile(io.BytesIO(zf.read(name))) as inner:
                    copy_from(inner)
    try:
        with zipfile.ZipFile(archive) as zf:
            copy_from(zf)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(f"{url}: not a valid zip archive ({e}); check --url") from None
    if not written:
        raise DataError(f"{url}: the archive holds none of {', '.join(DAILYDIALOG_FILES)}; check --url")
    return written


# name: (official URL, its sha256, unpack(archive, url, dest) -> paths, what to copy into dest by hand)
DOWNLOADS = {
    "convai2": (CONVAI2_URL, CONVAI2_SHA256, _unpack_convai2,
                f"train{CONVAI2_SUFFIX} and valid{CONVAI2_SUFFIX} from it"),
    "dailydialog": (DAILYDIALOG_URL, DAILYDIALOG_SHA256, _unpack_dailydialog,
                    "ijcnlp_dailydialog/dialogues_text.txt from it (and, for the official splits, "
                    "dialogues_train.txt, dialogues_validation.txt and dialogues_test.txt from the train.zip, "
                    "validation.zip and test.zip inside it)"),
}


def download(name, dest, url=None, sha256=None, timeout=30.0):
    """Fetch data set `name`'s archive (url: the official one by default), check its sha256 (the given one, else
    the known one when url is the official URL; a custom URL without one is only checked to be a valid archive),
    and write only the files the loaders read into dest. Returns the written paths."""
    official, known, unpack, files = DOWNLOADS[name]
    url = url or official
    sha256 = sha256 or (known if url == official else None)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / ((Path(urllib.parse.urlparse(url).path).name or f"{name}.archive") + ".part")
    by_hand = f"Put the files there by hand: get {official} on a machine with network, and copy {files} into {dest}/"
    try:
        try:
            digest = _fetch(url, archive, timeout)
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, refused connections
            raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}). {by_hand}") from None
        if sha256 is not None and digest != sha256:
            raise DataError(f"{url}: sha256 {digest}, expected {sha256}; the download is corrupt or changed, "
                            f"run the command again. {by_hand}")
        return unpack(archive, url, dest)
    finally:
        archive.unlink(missing_ok=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="SPT data: print stats of a data set, or download ConvAI2 or DailyDialog.")
    ap.add_argument("spec", nargs="?", help=f"a ConvAI2 *{CONVAI2_SUFFIX}, a DailyDialog {DAILYDIALOG_PREFIX}*.txt, "
                                            "a .jsonl, or demo: print its stats")
    ap.add_argument("--download", choices=sorted(DOWNLOADS), help="fetch a data set into --dir")
    ap.add_argument("--dir", help=f"where --download writes the files the loaders read (ConvAI2: *{CONVAI2_SUFFIX}; "
                                  f"DailyDialog: {', '.join(DAILYDIALOG_FILES)})")
    ap.add_argument("--url", help="archive URL (default: the official one: ParlAI's convai2_fix_723.tgz, "
                                  "ijcnlp_dailydialog.zip)")
    ap.add_argument("--sha256", help="expected sha256 of the archive at --url (default: known for the official "
                                     "URL, none for a custom URL, which then is only checked to be a valid archive)")
    args = ap.parse_args(argv)
    if args.download:
        if not args.dir:
            ap.error("--download needs --dir DIR")
        if args.url and args.url != DOWNLOADS[args.download][0] and not args.sha256:
            print(f"no --sha256 for {args.url}: checking only that it is a valid archive", file=sys.stderr)
        try:
            paths = download(args.download, args.dir, args.url, args.sha256)
            for p in paths:
                s = stats(load_examples(p))
                print(f"wrote {p}: {s['dialogues']} dialogues, {s['examples']} examples")
        except DataError as e:
            sys.exit(f"error: {e}")
    elif args.spec:
        try:
            s = stats(load_examples(args.spec))
        except DataError as e:
            sys.exit(f"error: {e}")
        print(f"{args.spec}: {s['dialogues']} dialogues, {s['examples']} examples, "
              f"{s['mean_turns']:.2f} turns per dialogue (max {s['max_turn']}), "
              f"{s['mean_persona']:.2f} persona sentences per example")
    else:
        ap.error("give a data FILE (or demo) to print its stats, or --download convai2|dailydialog --dir DIR")


if __name__ == "__main__":
    main()
