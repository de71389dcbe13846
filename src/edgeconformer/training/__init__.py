"""Lightning pieces of the train stage that are not the model or the data: callbacks (the max_time guard, weight
averaging of the last epochs, decoding the test split after fit) and batched decoding of a feature dataset."""
