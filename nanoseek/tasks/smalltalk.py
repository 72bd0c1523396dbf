"""Plain conversational turns for SFT: a greeting, who the model is, what it can do, and a polite answer to
what it cannot do. Generated from templates and from the recipe's own tasks (their names and a sample
question each), never downloaded, with a one-line thought before each reply."""

import random

from nanoseek.tokenizer import split_thinking

# what a built-in task lets the model do, said in a reply; a task of the user's own is named as it is
CAN_DO = {
    "addition": "add whole numbers",
    "arithmetic": "add, subtract and multiply whole numbers",
    "countdown": "solve Countdown puzzles (reach a target from a few numbers with + - * /)",
    "equations": "solve linear equations",
    "sorting": "sort lists of numbers",
}

GREETINGS = ["hello", "hi", "hey", "hi there", "hello there", "good morning", "good afternoon", "good evening",
             "greetings", "howdy", "hey there", "hello nanoseek", "hi nanoseek", "yo", "hiya", "morning"]
WHO = ["who are you", "what are you", "what is your name", "what's your name", "are you a person",
       "are you human", "are you a robot", "tell me about yourself", "introduce yourself", "who made you",
       "what model are you", "are you chatgpt", "who am i talking to", "what should i call you"]
WHAT = ["what can you do", "how can you help me", "what are you good at", "help", "what can i ask you",
        "what do you know", "what are your skills", "how do i use you", "what kind of questions can you answer",
        "can you help me", "what tasks can you do", "show me what you can do"]
THANKS = ["thanks", "thank you", "thank you very much", "great, thanks", "ok thanks", "nice", "cool", "awesome",
          "perfect", "that's right", "good job", "well done", "ok", "bye", "goodbye", "see you"]
# requests outside what the model learned: it says so politely instead of guessing
CANNOT = ["write a poem about the sea", "what's the weather like today", "tell me a joke",
          "translate hello into french", "what is the capital of france", "write a python function that sorts a list",
          "give me a cake recipe",
          "what's in the news", "tell me a story", "what time is it", "who won the world cup", "explain gravity",
          "summarize this article", "recommend a good book", "what is the meaning of life", "how do i cook rice",
          "write an email to my boss", "what is love", "can you browse the web", "sing me a song",
          "what year is it", "how tall is mount everest", "draw a cat", "what do you think about politics",
          "teach me spanish", "what is bitcoin", "how do airplanes fly", "play a game with me",
          "what's your favourite colour", "do you have feelings", "help me with my homework essay",
          "what's the best programming language", "how far is the moon", "write a song", "who is the president"]
# never trained on: the report asks these to see that replies stay short
HELD_OUT_PROMPTS = ["describe a sunset", "what is photosynthesis", "can you speak german", "how old are you",
                    "write a haiku about autumn", "what's the population of tokyo", "tell me a fun fact",
                    "how do i fix my bike", "what is a black hole", "do you like music", "who wrote hamlet",
                    "plan a trip to rome", "what should i eat for dinner", "explain machine learning",
                    "is it going to rain tomorrow", "write a limerick", "how many legs does a spider have",
                    "what is the speed of light", "give me some advice", "let's talk about football"]


def styled(rng, prompt):
    """The prompt as people type it: capitalised or not, with or without its punctuation."""
    if rng.random() < 0.5:
        prompt = prompt[0].upper() + prompt[1:]
    if prompt.lower().startswith(("who", "what", "how", "are", "can", "do", "is")):
        return prompt + rng.choice(["?", "?", ""])
    return prompt + rng.choice(["", "!", "."])


def abilities(tasks):
    """'I can add whole numbers (like "What is 12 + 7?") and solve ...' for the tasks given, each with one fixed
    example question (a sentence the model can learn word for word)."""
    parts = []
    for task in tasks:
        example = task.sample(random.Random(task.name), "train", min(max(task.difficulties), 3)).question
        doing = CAN_DO.get(task.name, f"solve {task.name} problems")
        parts.append(f'{doing} (like "{example}")')
    return "I can " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


GREETING_REPLIES = ["Hello! I am nanoseek, a small reasoning model. Ask me a question.",
                    "Hi! I am nanoseek. Give me a problem to solve.", "Hello! How can I help?"]
# each kind of turn: its prompts and the one-line thought before its reply
KINDS = {"greeting": (GREETINGS, "A greeting."), "who": (WHO, "A question about me."),
         "what": (WHAT, "A question about what I can do."), "thanks": (THANKS, "A reply to my answer."),
         "cannot": (CANNOT, "Something I did not learn to do.")}


def thought_kind(reasoning):
    """The KINDS name whose thought the reasoning ends with (the kind a reply took its prompt for), else None."""
    reasoning = reasoning.strip()
    return next((kind for kind, (_, thought) in KINDS.items() if reasoning.endswith(thought)), None)


def reply_kind(completion):
    """thought_kind of a completion that began inside <think>."""
    return thought_kind(split_thinking(completion)[0])


def smalltalk_turn(tasks, rng):
    """(question, reasoning, answer) of one plain conversational turn about the model trained on `tasks`."""
    kind = rng.choice(["greeting", "who", "what", "thanks", "cannot", "cannot"])
    prompts, thought = KINDS[kind]
    question = styled(rng, rng.choice(prompts))
    if kind == "greeting":
        return question, thought, rng.choice(GREETING_REPLIES)
    if kind == "who":
        return (question, thought, "I am nanoseek, a small reasoning model trained from scratch. I think before I "
                "answer. " + abilities(tasks))
    if kind == "what":
        return question, thought, abilities(tasks)
    if kind == "thanks":
        return question, thought, rng.choice(["You're welcome!", "Glad to help. Ask me another one.", "Happy to help!"])
    return question, thought, "Sorry, I can't help with that: I am a small model. " + abilities(tasks)


def smalltalk_texts(tasks, n, seed=0):
    """n turns as plain text, for training the tokenizer on the words of the replies."""
    rng = random.Random(seed)
    return ["\n".join(smalltalk_turn(tasks, rng)) for _ in range(n)]
