/** A refusal with a message that says what was expected, what was found and what to do. */
export class RunnerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "RunnerError";
  }
}
